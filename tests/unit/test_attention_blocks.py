"""Long prompts attend in blocks of `QUERY_BLOCK` queries on XLA's path, each over the keys it can
see: the same logits and greedy tokens as HF (tested with a tiny block so the tiny models take the
blocked path, also for prompt chunks written after earlier ones), and a smaller temp arena. The
same prompts through the CPU prompt attention kernel (nx-kernels-cpu, where it runs) give the
same, with no score arrays in the arena at all."""

from __future__ import annotations

import pytest

import nx
from nx.ops import attention, cpu_kernels
from tests.cases.bloom import CASES as BLOOM
from tests.cases.llama import CASES as LLAMA
from tests.conftest import assert_close_logits, assert_same_greedy, left_padded

BUCKETS = dict(n_positions=[32, 64], context_length_estimate=[8, 16], progress=False)


KERNEL = pytest.mark.skipif(not cpu_kernels.available(), reason=str(cpu_kernels.unavailable_reason()))


@pytest.mark.parametrize("lengths", [[13, 6], [29, 9]], ids=["one-chunk", "two-chunks"])
@pytest.mark.parametrize("case,kernels", [(LLAMA[0], "off"), pytest.param(LLAMA[0], "auto", marks=KERNEL),
                                          (BLOOM[0], "auto")], ids=str)  # (BLOOM's ALiBi: always XLA's path)
def test_blocked_attention_matches_hf(case, kernels, lengths, saved_case, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, kernels)
    monkeypatch.setattr(attention, "QUERY_BLOCK", 4)  # 8- and 16-token prompt buckets: 2 and 4 blocks
    hf, path = saved_case(case)
    model = nx.load(case.family, path, batch_size=2, **BUCKETS)
    ids, mask = left_padded(lengths, case.vocab, seed=5)  # 29 tokens: a 16-token chunk, then 16 more at slot 16
    assert_close_logits(hf, model, ids, mask)
    assert_same_greedy(hf, model, ids, mask, 12)


def test_blocks_bound_the_scores_memory(saved_case, monkeypatch):
    _, path = saved_case(LLAMA[0])

    def temp_bytes(block: int, kernels: str = "off") -> int:
        monkeypatch.setenv(cpu_kernels.ENV, kernels)
        monkeypatch.setattr(attention, "QUERY_BLOCK", block)
        model = nx.load("llama", path, n_positions=[256], context_length_estimate=[256], compile=False, progress=False)
        return model.lower(1, 256, 256).compile().memory_analysis().temp_size_in_bytes

    whole, blocked = temp_bytes(256), temp_bytes(32)
    heads = 4  # LLAMA[0]: f32 scores of 4 heads x 256 queries x 256 keys are 1 MB whole, 128 KB per block
    assert whole - blocked >= heads * (256 - 32) * 256 * 4
    if cpu_kernels.available():  # the prompt kernel keeps one tile's scores, outside XLA's arena
        assert temp_bytes(256, "auto") <= blocked - heads * 32 * 256 * 4
