"""generate(): EOS handling per row, early stop, input types and streaming, against HF."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

import nx
from nx.programs import ProgramSet
from tests.cases.llama import CASES
from tests.conftest import assert_same_greedy, left_padded

CASE = CASES[0]


@pytest.fixture(scope="module")
def pair(saved_case):
    hf, path = saved_case(CASE)
    model = nx.load("llama", path, batch_size=2, n_positions=[32, 64], context_length_estimate=[16], progress=False)
    return hf, model


def _hf(hf, ids, mask, new, eos):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos, pad_token_id=0)


def test_warmup_compiles_every_program_and_changes_no_result(saved_case, monkeypatch):
    """Warm-up (each program run as soon as a worker has built it, the runs taking turns on the KV
    cache) leaves placeholder keys and values in the cache; greedy tokens must still be HF's."""

    hf, path = saved_case(CASE)
    model = nx.load("llama", path, batch_size=2, n_positions=[32, 64], context_length_estimate=[8, 16],
                    compile=False, warmup=True, progress=False)
    assert sorted(model.compiled_shapes) == sorted(model.program_shapes()) == sorted(model.programs.warmed)
    calls = []
    monkeypatch.setattr(ProgramSet, "run", lambda self, *a, **k: calls.append(a))
    model.warmup()  # every program is warm already
    assert calls == []
    monkeypatch.undo()
    ids, mask = left_padded([7, 4], CASE.vocab, seed=10)
    assert_same_greedy(hf, model, ids, mask, 20)


def test_parallel_compile_builds_each_program_once_on_several_threads(saved_case, monkeypatch):
    import threading


    hf, path = saved_case(CASE)
    model = nx.load("llama", path, batch_size=2, n_positions=[32, 64], context_length_estimate=[8, 16],
                    compile=False, compile_cache=False, progress=False)  # XLA compiles, not the cache
    built, real = [], ProgramSet.get

    def spy(self, key):
        built.append((key, threading.get_ident()))
        return real(self, key)

    monkeypatch.setattr(ProgramSet, "get", spy)
    model.compile(workers=2)
    keys = [k for k, _ in built]
    assert sorted(keys) == sorted(model.program_shapes()) == sorted(model.compiled_shapes)  # each once
    assert len({thread for _, thread in built}) == 2
    model.compile(workers=2)  # nothing left to build
    assert len(built) == len(keys)
    ids, mask = left_padded([7, 4], CASE.vocab, seed=13)
    assert_same_greedy(hf, model, ids, mask, 12)


@pytest.mark.parametrize(
    "n_positions, buckets, length, new, sample",
    [
        ([32, 64], [8, 16], 5, 4, False),  # one prefill bucket, one decode window
        ([32, 64], [8, 16], 20, 6, False),  # chunked prompt: 16 + 8
        ([32, 64], [8, 16], 30, 20, False),  # decode crosses from window 32 to 64
        ([32, 64], [8, 16], 63, 1, False),  # four chunks, one new token: no decode step
        ([20], [16], 18, 2, True),  # the last chunk starts early to fit the cache; sampled programs
    ],
)
def test_request_shapes_are_the_programs_generate_runs(saved_case, monkeypatch, n_positions, buckets, length, new, sample):
    """`nx generate` compiles only `request_shapes`: it must name every program the request calls."""

    hf, path = saved_case(CASE)
    model = nx.load("llama", path, n_positions=n_positions, context_length_estimate=buckets,
                    compile=False, progress=False)
    used, real = [], ProgramSet.get

    def spy(self, key):
        used.append(key)
        return real(self, key)

    monkeypatch.setattr(ProgramSet, "get", spy)
    ids, mask = left_padded([length], CASE.vocab, seed=length)
    model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=sample, seed=0)
    assert sorted(model.request_shapes(length, new, sample)) == sorted(set(used))
    with pytest.raises(nx.BucketError, match="max_new_tokens"):
        model.request_shapes(length, n_positions[-1], sample)


def test_eos_stops_each_row_and_pads_like_hf(pair):
    hf, model = pair
    ids, mask = left_padded([7, 4], CASE.vocab, seed=11)
    free = _hf(hf, ids, mask, 20, eos=None)
    eos = int(free[0, ids.shape[1] + 5])  # a token row 0 emits at step 5 and row 1 does not emit first
    ref = _hf(hf, ids, mask, 20, eos=eos)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    assert (out[0, ids.shape[1] + 6 :] == 0).all()


def test_stops_early_when_all_rows_finish(pair):
    hf, model = pair
    ids, mask = left_padded([7, 4], CASE.vocab, seed=12)
    free = _hf(hf, ids, mask, 20, eos=None)
    gen = free[:, ids.shape[1] :]
    eos = [int(gen[0, 2]), int(gen[1, 3])]
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, _hf(hf, ids, mask, 20, eos=eos))
    assert out.shape[1] < ids.shape[1] + 20


def test_input_types_agree(pair):
    _, model = pair
    ids, mask = left_padded([5, 5], CASE.vocab, seed=13)
    a = model.generate(ids, max_new_tokens=6, eos_token_id=[])
    b = model.generate(ids.numpy(), max_new_tokens=6, eos_token_id=[])
    c = model.generate(ids.tolist(), max_new_tokens=6, eos_token_id=[])
    assert torch.equal(a, b) and torch.equal(a, c)


def test_streamer_receives_prompt_then_each_token(pair):
    _, model = pair
    ids, mask = left_padded([6, 3], CASE.vocab, seed=14)

    class Collect:
        def __init__(self):
            self.chunks, self.ended = [], False

        def put(self, value):
            self.chunks.append(value.clone())

        def end(self):
            self.ended = True

    s = Collect()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[], streamer=s)
    assert s.ended and torch.equal(s.chunks[0], ids)
    assert torch.equal(torch.stack(s.chunks[1:], 1), out[:, ids.shape[1] :])


def test_scores_match_logits(pair):
    _, model = pair
    ids, mask = left_padded([6, 3], CASE.vocab, seed=15)
    res = model.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[], output_scores=True, return_dict=True)
    assert len(res.scores) == 3
    np.testing.assert_array_equal(res.scores[0], model.logits(ids, mask))
    assert (res.scores[1].argmax(-1) == res.sequences[:, -2].numpy()).all()
    assert res.timings["new_tokens"] == 3


def test_reusing_the_cache_across_calls_is_clean(pair):
    """A long request followed by a short one: stale cache entries must never leak in."""
    _, model = pair
    ids, mask = left_padded([14, 14], CASE.vocab, seed=16)
    short, smask = left_padded([3, 2], CASE.vocab, seed=17)
    first = model.generate(short, attention_mask=smask, max_new_tokens=10, eos_token_id=[])
    model.generate(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[])
    again = model.generate(short, attention_mask=smask, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(first, again)


def test_queued_step_is_harmless(pair):
    """Each step is queued before the previous one's tokens reach the host: abandoning a stream,
    or filling the cache to its last position, must neither fail nor change the next request."""
    hf, model = pair
    ids, mask = left_padded([9, 5], CASE.vocab, seed=18)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
    stream = model.stream(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    first = [next(stream) for _ in range(3)]
    stream.close()  # one step beyond these three was already queued
    np.testing.assert_array_equal(np.stack(first, 1), ref[:, ids.shape[1] : ids.shape[1] + 3].numpy())
    fill = 64 - ids.shape[1]  # the largest position bucket, exactly
    out = model.generate(ids, attention_mask=mask, max_new_tokens=fill, eos_token_id=[])
    assert torch.equal(out, _hf(hf, ids, mask, fill, eos=None))
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[]), ref)


def test_nx_load_infers_family(saved_case):
    _, path = saved_case(CASE)
    model = nx.load(path, compile=False, progress=False, n_positions=32)
    assert model.family.name == "llama"


def test_long_prompts_are_encoded_in_chunks(pair):
    """Prompts of 37 and 20 tokens with a largest prompt bucket of 16: three chunks, same as HF."""
    hf, model = pair
    ids, mask = left_padded([37, 20], CASE.vocab, seed=18)
    ref = _hf(hf, ids, mask, 20, eos=None)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(out, ref)
    chunk_programs = {k for k in model.compiled_shapes if k[1] == 16 and k[2] > 16}
    assert chunk_programs, "expected prefill programs attending past their own chunk"


@pytest.mark.parametrize("amp", ["bf16", "f16"])
def test_reduced_precision_amp(saved_case, amp):
    """amp casts weights, activations and KV cache; logits stay close to f32 (loose: 16-bit floats
    keep 8-11 mantissa bits) and the top token is among the f32 model's three most likely."""
    hf, path = saved_case(CASE)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        m = nx.load("llama", path, batch_size=2, amp=amp, n_positions=[32], context_length_estimate=[16], progress=False)
    # XLA:CPU has no f16 matmul kernels: nx says so when f16 is asked for on the CPU
    assert any("no f16 matmul kernels" in str(w.message) for w in seen) == (amp == "f16")
    leaf = m.params["layers"][0]["qkv"]["w"]
    assert str(leaf.dtype) == {"bf16": "bfloat16", "f16": "float16"}[amp]
    ids, mask = left_padded([7, 4], CASE.vocab, seed=19)
    ref = m.logits(ids, mask)
    from tests.conftest import hf_last_logits

    want = hf_last_logits(hf, ids, mask)
    scale = float(np.abs(want).max())
    assert np.abs(ref - want).max() < 0.05 * scale
    top3 = np.argsort(-want, axis=-1)[:, :3]
    assert all(ref[r].argmax() in top3[r] for r in range(2))
    out = m.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[])
    assert out.shape == (2, 12)
