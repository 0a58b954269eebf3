"""``kv_dtype``: a KV cache of another dtype than the compute's (a 16-bit cache under f32 compute,
as llama.cpp's f16 cache): half the cache's bytes, logits and greedy tokens close to HF's f32
(keys and values rounded once as written, attention's weights to the cache dtype), the CPU
kernels equal to the pure-XLA path, the option checked, normalized, saved in artifacts and
offered on the command line."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

import nx
from nx import memory
from nx.cli import main
from nx.config import RuntimeConfig
from nx.errors import ConfigError
from nx.ops import cpu_kernels
from tests.cases.llama import CASES
from tests.conftest import assert_kernel_matches_xla, assert_same_greedy, hf_last_logits, left_padded

CASE = CASES[0]
LOAD = dict(n_positions=[32, 64], context_length_estimate=[16], progress=False)
KERNEL_LEVELS = ["scalar"] + (["auto"] if (cpu_kernels.isa() or "").startswith("avx512") else [])


@pytest.mark.parametrize("kv", ["bf16", "f16"])
def test_16_bit_cache_under_f32_compute(saved_case, kv):
    hf, path = saved_case(CASE)
    model = nx.load("llama", path, batch_size=2, kv_dtype=kv, **LOAD)
    assert model.config.amp == "f32" and model.config.kv_dtype == kv and model.dtype == np.float32
    assert all(a.dtype == np.uint16 for pair in model.caches for a in pair)
    f32 = nx.load("llama", path, batch_size=2, compile=False, **LOAD)
    assert model.kv.nbytes() * 2 == f32.kv.nbytes()
    ids, mask = left_padded([13, 6], CASE.vocab, seed=3)
    ref = hf_last_logits(hf, ids, mask)
    got = model.logits(ids, mask)
    err = float(np.abs(got - ref).max()) / float(np.abs(ref).max())
    # keys and values rounded to 8 (bf16) or 11 (f16) significant bits: more than f32's summation
    # error, well under a logit's scale
    assert 1e-6 < err < (2e-2 if kv == "bf16" else 4e-3), err
    assert_same_greedy(hf, model, ids, mask, 12, tie=0.02)


@pytest.mark.skipif(not cpu_kernels.available(), reason=str(cpu_kernels.unavailable_reason()))
def test_bf16_cache_kernels_equal_the_xla_path(saved_case, monkeypatch):
    """f32 queries over a bf16 cache run the attention kernels (decode and prompt) with the same
    roundings as XLA's path."""
    _, path = saved_case(CASE)
    assert_kernel_matches_xla(path, dict(batch_size=2, kv_dtype="bf16", **LOAD), 2, CASE.vocab, KERNEL_LEVELS,
                              monkeypatch, rtol=1e-5)


def test_option_checked_and_normalized():
    assert RuntimeConfig.build(kv_dtype="bf16").cache_dtype == "bf16"
    assert RuntimeConfig.build(amp="bf16").cache_dtype == "bf16"
    assert RuntimeConfig.build(amp="bf16", kv_dtype="bf16").kv_dtype is None  # amp's: one spelling
    assert RuntimeConfig.build(amp="bf16", kv_dtype="f32").cache_dtype == "f32"
    with pytest.raises(ConfigError, match="kv_dtype"):
        RuntimeConfig.build(kv_dtype="q8_0")


def test_memory_estimate_counts_the_cache_dtype(saved_case):
    _, path = saved_case(CASE)
    model = nx.load("llama", path, compile=False, **LOAD)
    weights = model.family.weights(model.spec)
    w32, c32 = memory.estimate_bytes(model.spec, weights, 2, 64, 4)
    w16, c16 = memory.estimate_bytes(model.spec, weights, 2, 64, 4, 2)
    assert (w16, c16 * 2) == (w32, c32)


def test_artifact_keeps_the_cache_dtype(saved_case, tmp_path):
    _, path = saved_case(CASE)
    nx.load("llama", path, kv_dtype="bf16", compile=False, **LOAD).save(tmp_path / "a", progress=False)
    loaded = nx.load(tmp_path / "a", progress=False)
    assert loaded.config.kv_dtype == "bf16" and loaded.caches[0][0].dtype == np.uint16
    nx.load(tmp_path / "a", kv_dtype="bf16", compile=False, progress=False)  # the same: fine
    with pytest.raises(ConfigError, match="kv_dtype"):
        nx.load(tmp_path / "a", kv_dtype="f16", compile=False, progress=False)


@pytest.mark.parametrize("command", ["generate", "serve", "bench", "compile", "chat"])
def test_command_line_flag(command):
    res = CliRunner().invoke(main, [command, "--help"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "--kv-dtype" in res.output
