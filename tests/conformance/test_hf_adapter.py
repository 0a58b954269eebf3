"""transformers' own generate() through nx: same greedy tokens as HF's model and nx's generate."""

from __future__ import annotations

import pytest
import torch

import nx
from nx.hf import HuggingFaceGenerationModelAdapter
from nx.session import Session
from tests.cases.gpt2 import CASES as GPT2_CASES
from tests.cases.llama import CASES as LLAMA_CASES
from tests.conftest import left_padded

BUCKETS = dict(n_positions=[32, 64], context_length_estimate=[16])


@pytest.mark.parametrize("case", [LLAMA_CASES[0], GPT2_CASES[0]], ids=str)
def test_greedy_matches_hf_and_native(case, saved_case):
    hf, path = saved_case(case)
    m = nx.load(case.family, path, batch_size=3, progress=False, **BUCKETS)
    adapter = HuggingFaceGenerationModelAdapter(hf.config, m)
    ids, mask = left_padded([10, 4, 7], case.vocab, seed=31)
    kw = dict(attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = hf.generate(ids, **kw)
    out = adapter.generate(ids, **kw)
    assert torch.equal(out, ref)
    assert torch.equal(out, m.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[]))


def test_sampling_and_num_return_sequences(saved_case):
    """HF's sampling with temperature/top-k/top-p and 3 return sequences runs through nx: rows
    start from the shared prompt, differ, and top-k=1 reproduces HF's greedy output."""
    case = LLAMA_CASES[0]
    hf, path = saved_case(case)
    m = nx.load("llama", path, batch_size=3, progress=False, **BUCKETS)
    adapter = HuggingFaceGenerationModelAdapter(hf.config, m)
    ids, mask = left_padded([9], case.vocab, seed=32)
    torch.manual_seed(0)
    out = adapter.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, temperature=1.3, top_k=40,
                           top_p=0.95, num_return_sequences=3, pad_token_id=0)
    assert out.shape == (3, 21)
    assert all(torch.equal(r[:9], ids[0]) for r in out)
    assert len({tuple(r.tolist()) for r in out}) > 1
    greedy_like = adapter.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=1,
                                   num_return_sequences=3, pad_token_id=0)
    with torch.no_grad():
        ref = hf.generate(ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert all(torch.equal(r, ref[0]) for r in greedy_like)


@pytest.mark.parametrize("opts", [{}, {"tp_degree": 2}, {"unroll": 1}], ids=["plain", "tp2", "scanned"])
def test_beam_search_matches_hf(saved_case, opts, monkeypatch):
    """HF's beam search (3 beams for each of 2 left-padded prompts) through nx: beams reordered
    between steps have their KV cache rows gathered on the device, so the prompts are encoded
    once, and the result is HF's."""
    case = LLAMA_CASES[0]
    hf, path = saved_case(case)
    m = nx.load("llama", path, batch_size=6, progress=False, **BUCKETS, **opts)
    adapter = HuggingFaceGenerationModelAdapter(hf.config, m)
    ids, mask = left_padded([10, 6], case.vocab, seed=31)
    kw = dict(attention_mask=mask, max_new_tokens=20, num_beams=3, do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        ref = hf.generate(ids, **kw)
    starts, reorders = [], []
    start, reorder = Session.start, Session.reorder
    monkeypatch.setattr(Session, "start", lambda self, *a, **k: starts.append(1) or start(self, *a, **k))
    monkeypatch.setattr(Session, "reorder", lambda self, rows: reorders.append(rows.tolist()) or reorder(self, rows))
    assert torch.equal(adapter.generate(ids, **kw), ref)
    assert len(starts) == 1 and reorders  # beams were reordered, never re-encoded
