"""Continuous batching (`nx.Engine`): rows at different positions, per-row sampling, cancel, and
sharing one model between threads, checked against Hugging Face and against each request alone."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch

import nx
from nx.engine import Engine, QueueFullError
from tests.cases.llama import CASES
from tests.conftest import hf_greedy

CASE = CASES[0]
BUCKETS = dict(n_positions=[32, 64], context_length_estimate=[8, 16], progress=False)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(hf model, nx model with batch 4, running engine)."""
    hf = CASE.build()
    path = tmp_path_factory.mktemp("engine-llama")
    hf.save_pretrained(path)
    model = nx.load("llama", path, batch_size=4, compile=False, **BUCKETS)
    engine = Engine(model, max_queue=64).start()
    yield hf, model, engine
    engine.shutdown()


def prompts(n: int, seed: int = 0) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(3, CASE.vocab, int(k)).tolist() for k in rng.integers(2, 24, n)]


def hf_tokens(hf, prompt: list[int], new: int) -> list[int]:
    ids = torch.tensor([prompt])
    return hf_greedy(hf, ids, torch.ones_like(ids), new)[0, len(prompt):].tolist()


def test_rows_at_different_positions_match_hf_and_each_request_alone(served):
    """Requests of different prompt and output lengths join and leave the batch at every step;
    each one's greedy tokens equal HF's and the same request run alone (a prompt of 20 tokens
    also runs in chunks of the largest prompt bucket, 16)."""
    hf, _, engine = served
    ps = prompts(10, seed=1) + [list(range(3, 23))]
    news = [3 + (i * 5) % 17 for i in range(len(ps))]
    alone = [engine.submit(p, max_new_tokens=n, temperature=0, ignore_eos=True).result(120) for p, n in zip(ps, news)]
    reqs = [engine.submit(p, max_new_tokens=n, temperature=0, ignore_eos=True) for p, n in zip(ps, news)]
    together = [r.result(120) for r in reqs]
    assert together == alone
    for p, n, got in zip(ps, news, together):
        assert got == hf_tokens(hf, p, n)
    assert all(r.finish_reason == "length" for r in reqs)
    assert engine.stats()["running"] == 0 and engine.model.kv.free_rows == 4


def test_per_row_sampling_shares_a_step_and_seeds_repeat(served):
    """Greedy and sampled requests with different settings share steps: the greedy ones still
    equal HF, and a seeded sampled request gives the same tokens alone and in company."""
    hf, _, engine = served
    p = prompts(3, seed=2)
    seeded = dict(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, repetition_penalty=1.2, seed=7,
                  ignore_eos=True)
    alone = engine.submit(p[0], **seeded).result(120)
    mixed = [engine.submit(p[0], **seeded), engine.submit(p[1], max_new_tokens=12, temperature=0, ignore_eos=True),
             engine.submit(p[2], max_new_tokens=9, temperature=1.5, seed=3, ignore_eos=True)]
    out = [r.result(120) for r in mixed]
    assert out[0] == alone
    assert out[1] == hf_tokens(hf, p[1], 12)
    other_seed = engine.submit(p[0], **{**seeded, "seed": 8}).result(120)
    assert other_seed != alone  # the seed matters (12 tokens from 256 at temperature 0.9)


def test_stop_eos_and_min_new_tokens_are_per_request(served):
    hf, _, engine = served
    p = prompts(1, seed=3)[0]
    ref = hf_tokens(hf, p, 10)
    stop = engine.submit(p, max_new_tokens=10, temperature=0, stop=[ref[3:5]], ignore_eos=True)
    eos = engine.submit(p, max_new_tokens=10, temperature=0, eos_token_id=ref[2])
    late = engine.submit(p, max_new_tokens=10, temperature=0, eos_token_id=ref[0], min_new_tokens=4)
    assert stop.result(60) == ref[:5] and stop.finish_reason == "stop"
    assert eos.result(60) == ref[:3] and eos.finish_reason == "stop"
    got = late.result(60)
    assert ref[0] not in got[:4] and len(got) >= 4  # EOS banned for the first four tokens


def test_cancel_frees_the_row_within_a_step(served):
    _, model, engine = served
    long = engine.submit(prompts(1, seed=4)[0], max_new_tokens=40, temperature=0, ignore_eos=True)
    it = iter(long)
    next(it), next(it)
    long.cancel()
    assert long.result(30)[:2] and long.finish_reason == "cancelled" and len(long.tokens) < 40
    after = engine.submit([5, 6, 7], max_new_tokens=3, temperature=0, ignore_eos=True)
    assert len(after.result(30)) == 3
    assert engine.stats()["running"] == 0 and model.kv.free_rows == 4


def test_bad_requests_fail_at_submit_and_a_full_queue_says_when_to_retry(served):
    _, model, _ = served
    with pytest.raises(nx.BucketError, match="needs 70 positions"):
        Engine(model).submit([3] * 10, max_new_tokens=60)
    with pytest.raises(nx.InputError, match="outside the vocabulary"):
        Engine(model).submit([CASE.vocab + 1])
    with pytest.raises(nx.InputError, match="temperature must be a number >= 0"):
        Engine(model).submit([3], temperature=-1)
    idle = Engine(model, max_queue=2)  # not started: nothing leaves the queue
    idle.submit([3]), idle.submit([4])
    with pytest.raises(QueueFullError, match="queue is full") as err:
        idle.submit([5])
    assert err.value.retry_after > 0
    idle.shutdown(drain=False)


def test_threads_sharing_generate_get_their_own_tokens(served):
    """generate() from several threads waits its turn for the KV cache rows (and for the engine's)
    instead of mixing requests; an unfinished stream in the same thread is a clear error."""
    hf, model, engine = served
    ps = [p for p in prompts(8, seed=5)][:4]
    ids = [torch.tensor([p] * 4) for p in ps]
    want = [model.generate(i, max_new_tokens=6, eos_token_id=[]) for i in ids]
    got: dict[int, torch.Tensor] = {}

    def run(k: int) -> None:
        got[k] = model.generate(ids[k], max_new_tokens=6, eos_token_id=[])

    busy = engine.submit(ps[0], max_new_tokens=20, temperature=0, ignore_eos=True)  # the engine holds a row
    threads = [threading.Thread(target=run, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert all(torch.equal(got[k], want[k]) for k in range(4))
    assert busy.result(60) == hf_tokens(hf, ps[0], 20)
    stream = model.stream(ids[0], max_new_tokens=5, eos_token_id=[])
    next(stream)
    with pytest.raises(nx.InputError, match="still open in this thread"):
        model.generate(ids[1], max_new_tokens=2)
    stream.close()  # closing the stream gives its rows back
    assert torch.equal(model.generate(ids[1], max_new_tokens=6, eos_token_id=[]), want[1])


@pytest.mark.parametrize("opts", [dict(tp_degree=2), dict(unroll=1)], ids=["tp2", "scanned"])
def test_engine_under_tensor_parallelism_and_scanned_layers(tmp_path, opts):
    hf = CASE.build()
    hf.save_pretrained(tmp_path)
    model = nx.load("llama", tmp_path, batch_size=2, compile=False, **BUCKETS, **opts)
    engine = Engine(model).start()
    try:
        ps = prompts(3, seed=6)
        reqs = [engine.submit(p, max_new_tokens=6, temperature=0, ignore_eos=True) for p in ps]
        assert [r.result(120) for r in reqs] == [hf_tokens(hf, p, 6) for p in ps]
    finally:
        engine.shutdown()
