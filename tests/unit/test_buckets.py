"""Bucket policy and load options as pure functions of a RuntimeConfig: nothing compiles here."""

from __future__ import annotations

import pytest

import nx
from nx import buckets
from nx.buckets import ProgramKey
from nx.config import BAKED, OPTIONS, RuntimeConfig, validate


def cfg(**kw) -> RuntimeConfig:
    return RuntimeConfig.build(**kw)


def test_default_keys_are_a_prefill_per_prompt_bucket_and_a_decode_per_position_bucket():
    c = cfg(batch_size=4, prompt_batch_size=2, n_positions=[64, 256], context_length_estimate=[16, 128])
    assert buckets.default_keys(c) == [
        ProgramKey(2, 16, 64), ProgramKey(2, 128, 256), ProgramKey(4, 1, 64, steps=8), ProgramKey(4, 1, 256, steps=8)]
    assert ProgramKey(2, 16, 64).name == "prefill_b2_t16_w64"
    assert ProgramKey(4, 1, 256, True).name == "decode_b4_w256_sample"


def test_default_prompt_buckets_stop_at_1024():
    """Prompts beyond 1024 tokens run in chunks of 1024 by default (no padding to the next power of
    two; chunks within the CPU kernels' row limits)."""
    assert cfg(n_positions=512).context_buckets == (16, 32, 64, 128, 256, 512)
    assert cfg(n_positions=4096).context_buckets == (16, 32, 64, 128, 256, 512, 1024)
    assert list(buckets.prompt_chunks(cfg(n_positions=4096), 3072)) == [(0, 1024, 1024), (1024, 1024, 2048),
                                                                        (2048, 1024, 4096)]
    assert cfg(n_positions=4096, context_length_estimate=4096).context_buckets[-1] == 4096  # as asked


@pytest.mark.parametrize(
    ("length", "chunks"),
    [
        (10, [(0, 16, 64)]),  # one bucket holds it
        (16, [(0, 16, 64)]),
        (40, [(0, 32, 64), (32, 16, 64)]),  # longer than the largest prompt bucket: chunks, the rest in the smallest fit
        (250, [(0, 32, 64), (32, 32, 64), (64, 32, 128), (96, 32, 128), (128, 32, 256), (160, 32, 256),
               (192, 32, 256), (224, 32, 256)]),
    ],
)
def test_prompt_chunks_cover_the_prompt_in_bucket_sized_pieces(length, chunks):
    c = cfg(n_positions=[64, 128, 256], context_length_estimate=[16, 32])
    got = list(buckets.prompt_chunks(c, length))
    assert got == chunks
    assert got[-1][0] + got[-1][1] >= length  # every token is encoded
    assert all(start + n <= window for start, n, window in got)  # each chunk fits its window


def test_last_chunk_starts_early_rather_than_overflow_the_cache():
    c = cfg(n_positions=[64], context_length_estimate=[48])
    assert list(buckets.prompt_chunks(c, 60)) == [(0, 48, 64), (16, 48, 64)]  # re-encodes 32 tokens


@pytest.mark.parametrize(
    "options",
    [
        {"n_positions": [64, 128, 256], "context_length_estimate": [16, 32]},
        {"n_positions": [128, 200], "context_length_estimate": [16, 48]},  # 200 is no multiple of 48
        {"n_positions": 256, "context_length_estimate": 256},  # no prompt is ever chunked
        {"n_positions": [64, 256], "context_length_estimate": [64], "batch_size": 2},
    ],
)
def test_prefill_shapes_are_every_chunk_of_every_prompt_length(options):
    """What artifacts save (`all_keys`) and servers compile (`serving_keys`) is exactly what
    `prompt_chunks` can ask for over every prompt length (brute force over all of them)."""
    c = cfg(**options)
    seen = sorted({(n, w) for length in range(1, c.max_positions + 1) for _, n, w in buckets.prompt_chunks(c, length)})
    assert buckets.prefill_shapes(c) == seen
    prefill = {(k.tokens, k.window) for k in buckets.all_keys(c) if k.tokens > 1}
    assert prefill == set(seen) and set(buckets.default_keys(c)) <= set(buckets.all_keys(c))
    inserts = {(k.tokens, k.window) for k in buckets.serving_keys(c, sample=True) if k.insert and k.sample}
    assert inserts == set(seen)


def test_all_keys_add_the_windows_long_prompts_need():
    c = cfg(n_positions=[64, 128, 256], context_length_estimate=[16, 32])
    extra = set(buckets.all_keys(c)) - set(buckets.default_keys(c))
    assert extra == {ProgramKey(1, 32, 128), ProgramKey(1, 32, 256), ProgramKey(1, 16, 128), ProgramKey(1, 16, 256)}


def test_decode_windows_and_request_keys():
    c = cfg(n_positions=[32, 64], context_length_estimate=[16])
    assert buckets.decode_window(c, 31) == 32 and buckets.decode_window(c, 32) == 64
    assert buckets.decode_windows(c, 30, 4) == [32, 64]  # slots 30, 31, 32 are fed back
    assert buckets.request_keys(c, 10, 8) == [ProgramKey(1, 16, 32), ProgramKey(1, 1, 32, steps=8)]
    assert buckets.request_keys(c, 10, 8, sample=True)[0].sample


def test_multi_step_decode_keys_and_blocks():
    """decode_steps=k: one k-step decode program per window, each call cut at the window's end
    (so every step attends over the window a one-step call would) and at the steps still wanted."""
    c = cfg(n_positions=[32, 64], context_length_estimate=[16], decode_steps=4)
    assert c.decode_steps == 4 and cfg(n_positions=[32]).decode_steps == 8
    assert buckets.default_keys(c)[1:] == [ProgramKey(1, 1, 32, steps=4), ProgramKey(1, 1, 64, steps=4)]
    assert buckets.request_keys(c, 10, 30)[1:] == [ProgramKey(1, 1, 32, steps=4), ProgramKey(1, 1, 64, steps=4)]
    assert ProgramKey(1, 1, 64, steps=4).name == "decode_b1_w64_k4"
    assert ProgramKey(2, 1, 64, True, steps=8).name == "decode_b2_w64_k8_sample"
    assert ProgramKey(1, 1, 64, steps=1) == ProgramKey(1, 1, 64)  # k = 1 keys are the one-step programs
    assert buckets.serving_keys(c)[-1] == ProgramKey(1, 1, 64)  # continuous batching steps one token a call
    assert buckets.decode_block(c, 10, 4, 100) == (4, 32)
    assert buckets.decode_block(c, 30, 4, 100) == (2, 32)  # slots 30, 31: the rest from 32 over window 64
    assert buckets.decode_block(c, 32, 4, 100) == (4, 64)
    assert buckets.decode_block(c, 40, 4, 3) == (3, 64)  # max_new_tokens not a multiple of k
    assert buckets.decode_block(c, 63, 8, 1) == (1, 64)  # the cache's last slot
    with pytest.raises(nx.ConfigError, match="decode_steps must be a positive int"):
        cfg(decode_steps=0)


def test_fit_checks_name_the_limit_and_the_fix():
    c = cfg(n_positions=64)
    with pytest.raises(nx.BucketError, match="longer than the largest n_positions bucket 64"):
        buckets.check_fits(c, 65)
    with pytest.raises(nx.BucketError, match="needs 70 positions.*lower max_new_tokens"):
        buckets.request_keys(c, 60, 10)
    with pytest.raises(nx.BucketError, match="larger n_positions"):
        buckets.decode_window(c, 64)


def test_load_options_are_one_schema():
    assert {"batch_size", "n_positions", "tp_degree", "quant", "unroll", "decode_steps"} <= set(BAKED)
    assert validate({})["n_positions"] == 1024
    with pytest.raises(nx.ConfigError, match="unknown load option.*tp_dgree.*valid options"):
        validate({"tp_dgree": 2})
    for bad in ("128", 128.5, True, [], [64, "x"]):
        with pytest.raises(nx.ConfigError, match="n_positions must be"):
            validate({"n_positions": bad})
    with pytest.raises(nx.ConfigError, match="amp must be one of f32, bf16, f16"):
        validate({"amp": "fp8"})
    with pytest.raises(nx.ConfigError, match="prompt_batch_size=3 must divide batch_size=4"):
        cfg(batch_size=4, prompt_batch_size=3)
    assert all(o.help for o in OPTIONS)  # every option explains itself (nx.load docstring, --help)


def test_nx_load_signature_and_cli_flags_come_from_the_schema():
    import inspect

    from click.testing import CliRunner

    from nx.cli import main

    params = inspect.signature(nx.load).parameters
    assert [o.name for o in OPTIONS] == [p for p in params if p not in ("family_or_path", "path", "registry")]
    for command in ("generate", "bench", "compile"):
        out = CliRunner().invoke(main, [command, "--help"]).output
        assert "--tp" in out and "--tp-degree" not in out and "--n-positions" in out and "Position buckets" in out
        assert "--decode-steps" in out
    bad = CliRunner().invoke(main, ["generate", "x", "--prompt", "hi", "--n-positions", "abc"])
    assert bad.exit_code == 2 and "'abc' is not an int or a comma-separated list of ints" in bad.output


@pytest.mark.parametrize(
    "positions, expected",
    [
        ([128, 256], [16, 32, 48, 64, 80, 96, 112, 128, 256]),
        ([128, 256, 512, 1024], [16, 32, 48, 64, 80, 96, 112, 128, 256, 512, 1024]),
        ([64], [16, 32, 48, 64]),
        ([100], [16, 32, 48, 64, 80, 96, 100]),
        ([10], [10]),
        ([1024, 4096], [16, 32, 48, 64, 80, 96, 112, 128, 256, 512, 1024]),  # longer prompts: chunks of 1024
    ],
)
def test_serving_prompt_buckets_step_by_16_up_to_128_then_double(positions, expected):
    assert buckets.serving_context_buckets(positions) == expected
    cfg(n_positions=positions, context_length_estimate=expected)  # a valid configuration


def test_nx_serve_uses_serving_buckets_unless_given(tmp_path):
    from nx.cli import serving_load_kwargs

    flags = {"n_positions": "256", "context_length_estimate": None, "quant": None}
    assert serving_load_kwargs(str(tmp_path / "ckpt"), flags)["context_length_estimate"] == [
        16, 32, 48, 64, 80, 96, 112, 128, 256]
    given = serving_load_kwargs(str(tmp_path / "ckpt"), {**flags, "context_length_estimate": "16,64"})
    assert given["context_length_estimate"] == [16, 64]
