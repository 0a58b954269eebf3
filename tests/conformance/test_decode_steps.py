"""Multi-step decode (`decode_steps` k > 1: up to k decode steps per program call): every token
must be the one k = 1 chooses, and HF's for greedy, whatever the batch, EOS, stops or windows."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nx
from nx.buckets import ProgramKey
from tests.cases.llama import CASES
from tests.conftest import left_padded

CASE = CASES[0]
KS = [2, 3, 4, 8]


@pytest.fixture(scope="module")
def pair(saved_case):
    """(HF model, nx model of batch 3 with windows 32 and 64, one decode step a call by default)."""
    hf, path = saved_case(CASE)
    model = nx.load("llama", path, batch_size=3, n_positions=[32, 64], context_length_estimate=[16], progress=False)
    return hf, model


def _hf(hf, ids, mask, new, eos=None, **kw):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=eos,
                           pad_token_id=0, **kw)


def _each_k(model, ids, mask, **kw) -> torch.Tensor:
    """generate with k = 1, then every k of KS; all must agree. Returns k = 1's tokens."""
    ref = model.generate(ids, attention_mask=mask, decode_steps=1, **kw)
    for k in KS:
        out = model.generate(ids, attention_mask=mask, decode_steps=k, **kw)
        assert torch.equal(out, ref), f"decode_steps={k}:\n{out.tolist()}\nk=1:\n{ref.tolist()}"
    return ref


def test_greedy_ragged_batch_across_a_window_boundary_matches_hf(pair):
    """Prompts of 7, 4 and 11 tokens, 29 new: 28 decode steps (no multiple of 3, 8), crossing
    from window 32 to 64 at different block offsets for each k."""
    hf, model = pair
    ids, mask = left_padded([7, 4, 11], CASE.vocab, seed=21)
    ref = _each_k(model, ids, mask, max_new_tokens=29, eos_token_id=[])
    assert torch.equal(ref, _hf(hf, ids, mask, 29))


def test_eos_in_the_middle_of_a_block_pads_that_row_like_hf(pair):
    hf, model = pair
    ids, mask = left_padded([7, 4, 9], CASE.vocab, seed=22)
    free = _hf(hf, ids, mask, 20)
    eos = int(free[0, ids.shape[1] + 5])  # row 0 emits it at step 5: inside a block for every k
    ref = _each_k(model, ids, mask, max_new_tokens=20, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ref, _hf(hf, ids, mask, 20, eos=eos))
    assert (ref[0, ids.shape[1] + 6 :] == 0).all()


def test_every_row_finishing_mid_block_ends_generation_early(pair):
    hf, model = pair
    ids, mask = left_padded([7, 4, 5], CASE.vocab, seed=23)
    gen = _hf(hf, ids, mask, 24)[:, ids.shape[1] :]
    eos = [int(gen[0, 2]), int(gen[1, 3]), int(gen[2, 5])]
    ref = _each_k(model, ids, mask, max_new_tokens=24, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(ref, _hf(hf, ids, mask, 24, eos=eos))
    assert ref.shape[1] < ids.shape[1] + 24


def test_min_new_tokens_bans_eos_across_blocks(pair):
    _, model = pair
    ids, mask = left_padded([6, 6, 3], CASE.vocab, seed=24)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])[:, ids.shape[1] :]
    eos = [int(gen[0, 1]), int(gen[1, 2])]  # rows would stop at steps 1 and 2
    ref = _each_k(model, ids, mask, max_new_tokens=20, min_new_tokens=7, eos_token_id=eos, pad_token_id=0)
    assert ref.shape[1] > ids.shape[1] + 7


def test_stop_sequences_end_rows_mid_block(pair):
    _, model = pair
    ids, mask = left_padded([8, 5, 2], CASE.vocab, seed=25)
    gen = model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])[:, ids.shape[1] :]
    stop = [[int(gen[0, 4]), int(gen[0, 5])], [int(gen[2, 9])]]
    ref = _each_k(model, ids, mask, max_new_tokens=20, eos_token_id=[], pad_token_id=0, stop=stop)
    assert (ref[0, ids.shape[1] + 6 :] == 0).all()


def test_seeded_sampling_draws_the_same_tokens_for_every_k(pair):
    """Each step folds the row's key with its position, as k = 1 does, and the repetition
    penalty's seen-token masks are carried through the block: same seed, same tokens."""
    _, model = pair
    ids, mask = left_padded([7, 4, 11], CASE.vocab, seed=26)
    kw = dict(max_new_tokens=27, eos_token_id=[], do_sample=True, temperature=0.9, top_k=40, top_p=0.95,
              repetition_penalty=1.3, seed=1234)
    ref = _each_k(model, ids, mask, **kw)
    other = model.generate(ids, attention_mask=mask, decode_steps=4, **{**kw, "seed": 99})
    assert not torch.equal(ref, other)


def test_stream_yields_the_same_tokens_and_an_abandoned_stream_is_harmless(pair):
    _, model = pair
    ids, mask = left_padded([9, 5, 3], CASE.vocab, seed=27)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=13, eos_token_id=[], decode_steps=1)
    got = list(model.stream(ids, attention_mask=mask, max_new_tokens=13, eos_token_id=[], decode_steps=4))
    assert all(t.shape == (3,) for t in got)
    np.testing.assert_array_equal(np.stack(got, 1), ref[:, ids.shape[1] :].numpy())
    stream = model.stream(ids, attention_mask=mask, max_new_tokens=30, eos_token_id=[], decode_steps=4)
    first = [next(stream) for _ in range(2)]  # two blocks already queued
    stream.close()
    np.testing.assert_array_equal(np.stack(first, 1), ref[:, ids.shape[1] : ids.shape[1] + 2].numpy())
    fill = 64 - ids.shape[1]  # up to the cache's last position: the last block is cut to fit
    out = model.generate(ids, attention_mask=mask, max_new_tokens=fill, eos_token_id=[], decode_steps=8)
    assert torch.equal(out, model.generate(ids, attention_mask=mask, max_new_tokens=fill, eos_token_id=[],
                                           decode_steps=1))


def test_model_default_decode_steps_and_scores(saved_case, tmp_path):
    """decode_steps=4 at load: the default programs are 4-step decode programs, saved in an
    artifact and loaded from it; output_scores (every step's logits) runs one step a call."""
    hf, path = saved_case(CASE)
    model = nx.load("llama", path, batch_size=3, n_positions=[32, 64], context_length_estimate=[16], decode_steps=4,
                    progress=False)
    assert model.config.decode_steps == 4
    decode = [k for k in model.program_shapes() if k.tokens == 1]
    assert decode == [ProgramKey(3, 1, 32, steps=4), ProgramKey(3, 1, 64, steps=4)]
    assert decode[0].name == "decode_b3_w32_k4"
    ids, mask = left_padded([7, 4, 11], CASE.vocab, seed=28)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=25, eos_token_id=[])
    assert torch.equal(ref, _hf(hf, ids, mask, 25))
    res = model.generate(ids, attention_mask=mask, max_new_tokens=5, eos_token_id=[], output_scores=True,
                         return_dict=True)
    assert len(res.scores) == 5 and torch.equal(res.sequences, ref[:, : ids.shape[1] + 5])
    model.save(tmp_path / "art")
    again = nx.load(tmp_path / "art", progress=False)
    assert again.config.decode_steps == 4
    missing = []
    again.programs.on_missing = missing.append
    assert torch.equal(again.generate(ids, attention_mask=mask, max_new_tokens=25, eos_token_id=[]), ref)
    assert missing == []  # every decode program came from the artifact
    with pytest.raises(nx.ConfigError, match="decode_steps"):
        nx.load(tmp_path / "art", decode_steps=2, progress=False)


def test_bad_decode_steps_is_an_input_error(pair):
    _, model = pair
    with pytest.raises(nx.InputError, match="decode_steps must be an int >= 1"):
        model.generate([[5, 6]] * 3, max_new_tokens=3, decode_steps=0)


def test_context_broadcasting_bf16_sampling_and_scanned_layers(saved_case):
    """Two prompts broadcast to four rows, bf16, sampled: k = 4 draws k = 1's tokens; and with the
    layers scanned (unroll) greedy tokens agree too."""
    _, path = saved_case(CASE)
    ids, mask = left_padded([7, 4], CASE.vocab, seed=29)
    m = nx.load("llama", path, batch_size=4, prompt_batch_size=2, amp="bf16", n_positions=[32, 64],
                context_length_estimate=[16], compile=False, progress=False)
    kw = dict(attention_mask=mask, max_new_tokens=30, eos_token_id=[], do_sample=True, seed=3)
    assert torch.equal(m.generate(ids, decode_steps=4, **kw), m.generate(ids, decode_steps=1, **kw))
    m = nx.load("llama", path, batch_size=2, unroll=1, n_positions=[32, 64], context_length_estimate=[16],
                compile=False, progress=False)
    kw = dict(attention_mask=mask, max_new_tokens=30, eos_token_id=[])
    assert torch.equal(m.generate(ids, decode_steps=4, **kw), m.generate(ids, decode_steps=1, **kw))


def test_bf16_decode_loop_gathers_the_table_inside_the_loop(saved_case):
    """The multi-step program of a bf16 model compiles with nx's options so that XLA:CPU does not
    hoist an f32 copy of the whole embedding table out of the loop (written at every call)."""
    from nx import xla_options

    _, path = saved_case(CASES[1])  # tied embeddings: the table is the lm head too
    m = nx.load("llama", path, batch_size=1, amp="bf16", n_positions=[32], context_length_estimate=[16],
                compile=False, progress=False)
    key = ProgramKey(1, 1, 32, False, steps=4)
    text = m.programs.lower(key).compile(xla_options.compiler_options("cpu", loop=True)).as_text()
    entry = text.split("\nENTRY", 1)[1]  # what runs once a call, around the loop
    assert "while(" in entry and f"f32[{CASES[1].vocab},{m.spec.hidden_size}]" not in entry
