"""On-device sampling, checked statistically and against HF where HF defines the behaviour."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nx
from tests.cases.llama import CASES
from tests.conftest import left_padded

CASE = CASES[0]
BUCKETS = dict(n_positions=[32, 64], context_length_estimate=[16])


@pytest.fixture(scope="module")
def pair(saved_case):
    hf, path = saved_case(CASE)
    return hf, nx.load("llama", path, batch_size=2, progress=False, **BUCKETS)


@pytest.fixture(scope="module")
def wide(saved_case):
    """One prompt broadcast to 64 rows: many independent draws per program call."""
    hf, path = saved_case(CASE)
    return hf, nx.load("llama", path, batch_size=64, prompt_batch_size=1, progress=False, **BUCKETS)


PROMPTS = left_padded([9, 5], CASE.vocab, seed=21)


def _gen(model, **kw):
    ids, mask = PROMPTS
    kw.setdefault("eos_token_id", [])
    return model.generate(ids, attention_mask=mask, max_new_tokens=kw.pop("n", 16), **kw)


def test_top_k_1_equals_greedy(pair):
    _, m = pair
    assert torch.equal(_gen(m, do_sample=True, top_k=1, seed=1), _gen(m))


def test_tiny_temperature_equals_greedy(pair):
    _, m = pair
    assert torch.equal(_gen(m, do_sample=True, temperature=1e-4, top_k=None, seed=2), _gen(m))


def test_same_seed_same_tokens_different_seed_different_tokens(pair):
    _, m = pair
    a = _gen(m, do_sample=True, temperature=1.5, top_k=None, seed=7, n=24)
    b = _gen(m, do_sample=True, temperature=1.5, top_k=None, seed=7, n=24)
    c = _gen(m, do_sample=True, temperature=1.5, top_k=None, seed=8, n=24)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert not torch.equal(a, _gen(m, n=24))


def _ranks(scores: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    """Rank (0 = most likely) of each chosen token among its step's logits."""
    chosen = np.take_along_axis(scores, tokens[:, None], axis=1)
    return (scores > chosen).sum(1)


@pytest.mark.parametrize("seed", range(4))
def test_top_k_never_leaves_the_k_most_likely(pair, seed):
    _, m = pair
    res = _gen(m, do_sample=True, temperature=3.0, top_k=3, seed=seed, n=20, output_scores=True, return_dict=True)
    new = res.sequences[:, -len(res.scores) :].numpy()
    for step, scores in enumerate(res.scores):
        assert (_ranks(scores, new[:, step]) < 3).all()


@pytest.mark.parametrize("seed", range(4))
def test_top_p_stays_inside_the_nucleus(pair, seed):
    _, m = pair
    top_p = 0.6
    res = _gen(m, do_sample=True, temperature=2.0, top_k=None, top_p=top_p, seed=seed, n=20, output_scores=True,
               return_dict=True)
    new = res.sequences[:, -len(res.scores) :].numpy()
    for step, scores in enumerate(res.scores):
        z = scores / 2.0
        p = np.exp(z - z.max(1, keepdims=True))
        p /= p.sum(1, keepdims=True)
        order = np.argsort(-p, axis=1)
        sorted_p = np.take_along_axis(p, order, axis=1)
        before = np.cumsum(sorted_p, axis=1) - sorted_p
        nucleus_size = (before < top_p).sum(1)
        rank = _ranks(scores, new[:, step])
        assert (rank < nucleus_size + 1e-9).all()  # tiny slack only for exact probability ties


def test_first_token_distribution_matches_softmax(wide):
    """2,560 first tokens at T=2 against softmax(logits / T): chi-square over the 10 most likely
    tokens plus the rest, 10 degrees of freedom, rejected at p < 0.001 (critical value 29.59)."""
    _, m = wide
    ids = left_padded([6], CASE.vocab, seed=22)[0]
    temperature = 2.0
    logits = m.logits(ids)[0]
    z = logits / temperature
    p = np.exp(z - z.max())
    p /= p.sum()
    draws = np.concatenate(
        [m.generate(ids, max_new_tokens=1, do_sample=True, temperature=temperature, top_k=None, seed=s,
                    eos_token_id=[])[:, -1].numpy() for s in range(40)]
    )
    top = np.argsort(-p)[:10]
    observed = np.array([(draws == t).sum() for t in top] + [(~np.isin(draws, top)).sum()])
    expected = np.append(p[top], 1 - p[top].sum()) * len(draws)
    assert expected.min() > 5, "bins too small for a chi-square test"
    chi2 = ((observed - expected) ** 2 / expected).sum()
    assert chi2 < 29.59, (chi2, observed, expected.round(1))


def _hf(hf, ids, mask, **kw):
    with torch.no_grad():
        return hf.generate(ids, attention_mask=mask, do_sample=False, pad_token_id=0, **kw)


def test_repetition_penalty_matches_hf(pair, saved_case):
    hf, path = saved_case(CASE)
    m1 = nx.load("llama", path, batch_size=1, progress=False, **BUCKETS)
    ids, _ = left_padded([8], CASE.vocab, seed=23)
    ref = _hf(hf, ids, None, max_new_tokens=24, repetition_penalty=1.8, eos_token_id=None)
    out = m1.generate(ids, max_new_tokens=24, repetition_penalty=1.8, eos_token_id=[])
    assert torch.equal(out, ref)
    assert not torch.equal(out, m1.generate(ids, max_new_tokens=24, eos_token_id=[]))


def test_min_new_tokens_matches_hf(pair):
    hf, m = pair
    ids, mask = PROMPTS
    free = _gen(m)
    eos = int(free[0, ids.shape[1] + 1])  # row 0 would stop after 2 tokens
    ref = _hf(hf, ids, mask, max_new_tokens=16, min_new_tokens=6, eos_token_id=eos)
    out = m.generate(ids, attention_mask=mask, max_new_tokens=16, min_new_tokens=6, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(out, ref)
    assert (out[0, ids.shape[1] : ids.shape[1] + 6] != eos).all()


def test_stop_sequences_end_a_row(pair):
    _, m = pair
    ids, mask = PROMPTS
    free = _gen(m)
    n = ids.shape[1]
    stop = [free[0, n + 3].item(), free[0, n + 4].item()]
    out = m.generate(ids, attention_mask=mask, max_new_tokens=16, stop=[stop], eos_token_id=[], pad_token_id=0)
    assert out[0, n + 3 : n + 5].tolist() == stop
    assert (out[0, n + 5 :] == 0).all()
    row1 = free[1, n:].tolist()
    hit = any(row1[i : i + 2] == stop for i in range(len(row1) - 1))
    if not hit:
        assert torch.equal(out[1], free[1, : out.shape[1]])


def test_context_broadcasting_shares_the_prompt(saved_case):
    """One prompt encoded once fills 5 rows: greedy rows are identical (and equal batch-1 output),
    sampled rows differ from each other and between seeds."""
    _, path = saved_case(CASE)
    m = nx.load("llama", path, batch_size=5, prompt_batch_size=1, progress=False, **BUCKETS)
    one = nx.load("llama", path, batch_size=1, progress=False, **BUCKETS)
    ids, _ = left_padded([11], CASE.vocab, seed=24)
    greedy = m.generate(ids, max_new_tokens=12, eos_token_id=[])
    assert greedy.shape == (5, 23)
    assert all(torch.equal(row, greedy[0]) for row in greedy)
    assert torch.equal(greedy[:1], one.generate(ids, max_new_tokens=12, eos_token_id=[]))
    assert any(k[0] == 1 and k[1] > 1 for k in m.compiled_shapes), "prefill should run on the single prompt row"
    k0 = np.asarray(m.caches[0][0])[:, :11]
    assert all(np.array_equal(k0[r], k0[0]) for r in range(5)), "every row holds the prompt's cache"
    s1 = m.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=None, seed=1, eos_token_id=[])
    s2 = m.generate(ids, max_new_tokens=12, do_sample=True, temperature=1.5, top_k=None, seed=2, eos_token_id=[])
    assert len({tuple(r.tolist()) for r in s1}) > 1
    assert not torch.equal(s1, s2)
    assert all(torch.equal(r[:11], ids[0]) for r in s1)


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(do_sample=True, temperature=0.0), "temperature must be > 0"),
        (dict(do_sample=True, temperature=-1.0), "temperature must be > 0"),
        (dict(do_sample=True, top_p=0.0), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_p=1.5), r"top_p must be in \(0, 1\]"),
        (dict(do_sample=True, top_k=0), "top_k must be an int >= 1"),
        (dict(repetition_penalty=0.0), "repetition_penalty must be > 0"),
        (dict(min_new_tokens=40), "min_new_tokens must be an int in"),
        (dict(stop=[[1], []]), "stop sequences must not be empty"),
    ],
)
def test_bad_sampling_arguments(pair, kw, match):
    _, m = pair
    with pytest.raises(nx.InputError, match=match):
        _gen(m, **kw)


def test_stream_yields_each_step(pair):
    _, m = pair
    ids, mask = PROMPTS
    steps = list(m.stream(ids, attention_mask=mask, max_new_tokens=6, eos_token_id=[]))
    assert len(steps) == 6 and all(s.shape == (2,) for s in steps)
    assert np.array_equal(np.stack(steps, 1), _gen(m, n=6)[:, ids.shape[1] :].numpy())


@pytest.mark.parametrize("seed", [0, 1, 7, 123456789, 2**31 - 1, 2**31, 2**40 + 3, -5])
def test_row_keys_are_jax_fold_in_of_the_seed(seed):
    """Host-computed keys (seeds in [0, 2**31)) equal jax's own, and so do jax-computed ones."""
    import jax

    from nx.session import row_keys

    key = jax.random.key(seed)
    want = np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(key, b))) for b in range(5)])
    got = row_keys(seed, 5)
    assert got.dtype == want.dtype and np.array_equal(got, want)
