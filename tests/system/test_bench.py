"""`nx bench` on a tiny checkpoint without a tokenizer: the JSON report is complete and consistent.

This checks the harness (keys, positive figures, bytes/time arithmetic), never how fast anything is.
"""

from __future__ import annotations

import json
import math

import pytest
from click.testing import CliRunner

from nx.cli import main
from tests.cases.llama import CASES

CASE = CASES[0]
PROMPTS = [8, 40]  # 40 > the largest prompt bucket (32): exercises chunked prefill
NEW = 6

RUN_KEYS = {
    "batch_size", "n_positions", "context_buckets", "n_programs", "load_s", "compile_s", "warmup_s", "weight_bytes",
    "kv_cache_bytes", "peak_rss_bytes", "peak_rss_reset", "rss_before_load_bytes", "peak_rss_ratio",
    "peak_rss_growth_ratio", "prompts", "save_s", "artifact_bytes", "cached_load_s", "cached_first_token_s",
    "compile_from_cache_s", "compile_cache_hits",
}
PROMPT_KEYS = {
    "prompt_tokens", "ttft_s", "new_tokens", "decode_steps", "decode_s", "decode_tokens_per_s", "latency_p50_ms",
    "latency_p99_ms", "weight_bytes_per_step", "kv_bytes_per_step", "bytes_per_step", "bytes_per_token",
    "bandwidth_gbs",
}


@pytest.fixture(scope="module")
def report(saved_case):
    _, path = saved_case(CASE)
    args = ["bench", "llama", path, "--batch-sizes", "1,2", "--prompt-lengths", ",".join(map(str, PROMPTS)),
            "--new-tokens", str(NEW), "--n-positions", "64", "--context-length-estimate", "16,32", "--json"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


def test_report_has_every_figure(report):
    assert report["new_tokens"] == NEW and report["prompt_lengths"] == PROMPTS
    assert report["machine"]["cores"] >= 1 and "nx-core" in report["machine"]["versions"]
    assert report["machine"]["cpu_kernels"]  # what int8 decode ran on, for the record
    assert [r["batch_size"] for r in report["runs"]] == [1, 2]
    for run in report["runs"]:
        assert set(run) >= RUN_KEYS
        assert run["n_positions"] == [64] and run["context_buckets"] == [16, 32]
        assert run["n_programs"] == 3
        assert run["compile_cache_hits"] == 3  # the cold compile (into an empty cache) stored every program
        assert [p["prompt_tokens"] for p in run["prompts"]] == PROMPTS
        for p in run["prompts"]:
            assert set(p) >= PROMPT_KEYS


def test_figures_are_positive_and_consistent(report, saved_case):
    hf, _ = saved_case(CASE)
    n_params = sum(t.numel() for t in hf.parameters())
    cfg = hf.config
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    for run in report["runs"]:
        b = run["batch_size"]
        for key in ("load_s", "compile_s", "warmup_s", "peak_rss_bytes", "peak_rss_ratio", "save_s", "cached_load_s",
                    "cached_first_token_s", "compile_from_cache_s"):
            assert run[key] > 0, key
        # f32 weights: 4 bytes per HF parameter (tied or fused layouts change names, not bytes)
        assert run["weight_bytes"] == 4 * n_params
        assert run["artifact_bytes"] > run["weight_bytes"]  # weights + compiled programs + manifest
        assert run["kv_cache_bytes"] == 2 * cfg.num_hidden_layers * b * 64 * cfg.num_key_value_heads * head_dim * 4
        if run["rss_before_load_bytes"] is not None:  # Linux
            assert run["peak_rss_bytes"] >= run["rss_before_load_bytes"] > 0
            assert run["peak_rss_growth_ratio"] < run["peak_rss_ratio"]
        for p in run["prompts"]:
            assert p["new_tokens"] == NEW and p["decode_steps"] == NEW - 1
            for key in ("ttft_s", "decode_s", "decode_tokens_per_s", "latency_p50_ms", "latency_p99_ms",
                        "bytes_per_step", "bandwidth_gbs"):
                assert p[key] > 0 and math.isfinite(p[key]), key
            assert p["latency_p50_ms"] <= p["latency_p99_ms"]
            assert math.isclose(p["decode_tokens_per_s"], b * (NEW - 1) / p["decode_s"], rel_tol=1e-9)
            # step t attends the prompt and t positions of the 64 the cache holds
            seen = [p["prompt_tokens"] + t for t in range(1, NEW)]
            assert math.isclose(p["kv_bytes_per_step"], run["kv_cache_bytes"] * sum(seen) / len(seen) / 64)
            assert p["bytes_per_step"] == run["weight_bytes"] + p["kv_bytes_per_step"]
            assert math.isclose(p["bytes_per_token"], p["bytes_per_step"] / b, rel_tol=1e-9)
            gbs = p["bytes_per_step"] * p["decode_steps"] / p["decode_s"] / 1e9
            assert math.isclose(p["bandwidth_gbs"], gbs, rel_tol=1e-9)


def test_table_report_int8_without_artifact(saved_case):
    _, path = saved_case(CASE)
    args = ["bench", "llama", path, "--batch-sizes", "1", "--prompt-lengths", "8", "--new-tokens", "3",
            "--n-positions", "64", "--context-length-estimate", "16", "--quant", "s8", "--no-cached-load"]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    assert "cold compile" in res.stdout and "decode tok/s" in res.stdout and "GB/s" in res.stdout
    assert "artifact" not in res.stdout
    res = CliRunner().invoke(main, [*args, "--json"])
    report = json.loads(res.stdout)
    assert report["quant"]["quant_dtype"] == "s8"
    run = report["runs"][0]
    assert "cached_load_s" not in run
    # int8 weights with f32 scales: well under the f32 bytes (norms stay f32)
    hf, _ = saved_case(CASE)
    assert run["weight_bytes"] < 0.5 * 4 * sum(t.numel() for t in hf.parameters())


def test_too_long_is_one_clear_line(saved_case):
    _, path = saved_case(CASE)
    res = CliRunner().invoke(main, ["bench", "llama", path, "--prompt-lengths", "60", "--new-tokens", "8",
                                    "--n-positions", "64"])
    assert res.exit_code == 2 and "--n-positions 68" in res.stderr and "Traceback" not in res.output


def test_block_latency_is_a_block_time_over_its_steps():
    """With k decode steps a call, tokens reach the host k at a time: each step's latency is its
    block's time over k, not the near-zero gaps inside a block."""
    from nx.bench import StepTimes

    s = StepTimes(2, 0.1, [0.08, 0.0, 0.0, 0.0, 0.04, 0.0], block=4).summary()
    assert s["latency_p50_ms"] == pytest.approx(20.0) and s["latency_p99_ms"] == pytest.approx(20.0)
    assert s["decode_tokens_per_s"] == pytest.approx(2 * 6 / 0.12)
    one = StepTimes(2, 0.1, [0.08, 0.0, 0.0, 0.0, 0.04, 0.0]).summary()
    assert one["latency_p50_ms"] == pytest.approx(0.0)
