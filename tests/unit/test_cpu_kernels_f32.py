"""nx-kernels-cpu's f32 kernel (the default precision's decode matmuls) against an f64 reference
and the pure-XLA path: at every dispatch level this CPU runs, rows 1..16 (nx sends it 2..16), odd k and n
(the vector tails, the 4-row weight tiles' tail), inside jit, scan and shard_map, only on the cpu platform, and
greedy tokens of a whole f32 model.

Tolerance: the kernel sums k f32 products (fused into the sums) in some order, so its error is within
the worst-case bound of f32 summation, ``k * 2**-24 * (|x| @ |w|.T)`` (XLA's as well); sums that are
exact in f32 (small integers) come out bit for bit."""

from __future__ import annotations

import importlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nx.ops import cpu_kernels
from tests.cases.llama import CASES
from tests.conftest import assert_kernel_matches_xla
from tests.unit.staged_kernels import (
    assert_chosen_when_lowered,
    assert_exact_integer_sums,
    assert_xla_off_the_cpu,
    scan_and_shard_map,
)

linear = importlib.import_module("nx.ops.linear")  # `nx.ops.linear` is also the function

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=str(cpu_kernels.unavailable_reason()))

ORDER = ["scalar", "avx2", "avx512_vnni", "avx512_bf16"]
#: Every level this CPU runs (the f32 kernel runs both AVX-512 levels as AVX-512F; both stay listed
#: so the mapping is tested too).
LEVELS = ORDER[: ORDER.index(cpu_kernels.isa() or "scalar") + 1]
#: [k, n]: SmolLM2-135M's projections and odd sizes (k not a multiple of 8 or 16, n not of 4).
SIZES = [(576, 960), (1536, 576), (100, 37), (33, 6), (1, 1), (64, 130), (47, 9), (200, 17), (17, 5)]
TARGET = "nx_kernels_cpu_f32_matmul"
U = 2.0**-24


def _random(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.01, 100, (m, 1)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 1, (n, 1)).astype(np.float32)
    return jnp.asarray(x), jnp.asarray(w)


def _check(got, x, w, factor=1.0):
    """|got - exact| within `factor` times the f32 summation bound."""
    xf, wf = np.asarray(x, np.float64), np.asarray(w, np.float64)
    exact, bound = xf @ wf.T, np.abs(xf) @ np.abs(wf).T
    k = xf.shape[1]
    err = np.abs(np.asarray(got, np.float64) - exact)
    assert (err <= factor * k * U * bound + 1e-30).all(), float((err / (k * U * bound + 1e-30)).max())


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("size", SIZES, ids=str)
def test_matmul_within_f32_summation_error(level, size):
    import nx_kernels_cpu

    k, n = size
    x, w = _random(16, k, n, seed=k + n)
    f = jax.jit(lambda x, w, t: nx_kernels_cpu.f32_matmul(x, w, level=level, threads=t), static_argnums=2)
    for m in range(1, 17):
        outs = [np.asarray(f(x[:m], w, t)) for t in (0, 1)]
        assert outs[0].shape == (m, n) and outs[0].dtype == np.float32
        np.testing.assert_array_equal(outs[0], outs[1])  # each output summed by one thread, in one order
        _check(outs[0], x[:m], w)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("m", [17, 37, 130])
def test_many_rows_across_spans(level, m):
    """Prompt-sized row counts: several x-row blocks (near-equal, up to 6 rows), k cut into spans with
    a partial last vector, n with a tail of weight rows; threads split the outputs alike."""
    import nx_kernels_cpu

    x, w = _random(m, 1100, 103, seed=m)
    f = jax.jit(lambda x, w, t: nx_kernels_cpu.f32_matmul(x, w, level=level, threads=t), static_argnums=2)
    outs = [np.asarray(f(x, w, t)) for t in (0, 1)]
    np.testing.assert_array_equal(outs[0], outs[1])
    _check(outs[0], x, w)


@pytest.mark.parametrize("level", LEVELS)
def test_large_shape_and_threads(level):
    """An lm-head-like shape: many output rows split over the pool, every row tile and tail."""
    import nx_kernels_cpu

    x, w = _random(5, 576, 4099, seed=3)
    got = np.asarray(jax.jit(lambda x, w: nx_kernels_cpu.f32_matmul(x, w, level=level))(x, w))
    _check(got, x, w)


@pytest.mark.parametrize("level", LEVELS)
def test_exact_sums_are_exact(level):
    """Small integers: every partial sum is exact in f32, whatever the order: bit for bit."""
    import nx_kernels_cpu

    assert_exact_integer_sums(nx_kernels_cpu.f32_matmul, jnp.float32, 1001, level)


@pytest.mark.parametrize("rows", sorted({cpu_kernels.F32_MIN_ROWS, 2, 3, cpu_kernels.F32_MAX_ROWS}))
@pytest.mark.parametrize("level", LEVELS)
def test_project_equals_the_xla_path(monkeypatch, level, rows):
    """`nx.ops.linear.project` (f32) with the kernel and on XLA's dots: both within f32 summation
    error of the exact sums, so within twice that of each other."""
    x, w = _random(rows, 576, 1000, seed=rows)
    x = x.reshape(rows, 1, 576)
    monkeypatch.setenv(cpu_kernels.ENV, level)
    got = np.asarray(jax.jit(lambda x, w: linear.project(x, w, jnp.float32))(x, w))
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    ref = np.asarray(jax.jit(lambda x, w: linear.project(x, w, jnp.float32))(x, w))
    assert got.shape == ref.shape == (rows, 1, 1000)
    x2 = x.reshape(rows, -1)
    _check(got.reshape(rows, -1), x2, w)
    _check(ref.reshape(rows, -1), x2, w)
    xf, wf = np.asarray(x2, np.float64), np.asarray(w, np.float64)
    assert (np.abs(got - ref).reshape(rows, -1) <= 2 * 576 * U * (np.abs(xf) @ np.abs(wf).T)).all()


def _lowered(x, w, **kw):
    return jax.jit(lambda x, w: linear.project(x, w, jnp.float32)).trace(x, w).lower(**kw).as_text()


def test_dispatch_and_off_switch(monkeypatch):
    x, w = _random(4, 64, 32)
    assert TARGET in _lowered(x, w)  # on by default where the package runs
    assert TARGET not in _lowered(x.astype(jnp.bfloat16), w)  # bf16 activations stay on XLA's dots
    assert TARGET not in _lowered(x, w.astype(jnp.bfloat16))  # bf16 weights: the bf16 kernel
    for level in LEVELS[1:]:  # the row limit at each level (the AVX-512 tiles take prompt chunks)
        monkeypatch.setenv(cpu_kernels.ENV, level)
        limit = cpu_kernels.F32_MAX_ROWS if level.startswith("avx512") else cpu_kernels.F32_AVX2_MAX_ROWS
        many = jnp.zeros((limit + 1, 64), jnp.float32)
        assert TARGET not in _lowered(many, w)  # larger batches and prompts stay on XLA's GEMM
        rows = jnp.zeros((2, limit // 2, 64), jnp.float32)
        assert TARGET in _lowered(rows, w)  # the row limit in any leading shape
        one = jnp.zeros((1, 1, 64), jnp.float32)  # one row: the kernel at AVX-512, XLA's matvec at avx2
        assert (TARGET in _lowered(one, w)) == level.startswith("avx512")
    monkeypatch.delenv(cpu_kernels.ENV)
    assert TARGET in jax.jit(lambda x, w: linear.lm_head(x, w)).lower(x, w).as_text()  # lm head / tied table
    assert_chosen_when_lowered(TARGET, _lowered, x, w, LEVELS, monkeypatch)


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_other_platforms_lower_the_xla_path(platform):
    """A program exported for an accelerator never calls the cpu-only FFI target."""
    x, w = _random(cpu_kernels.F32_MIN_ROWS, 64, 32)
    assert_xla_off_the_cpu(TARGET, x, w, platform)


def test_inside_scan_and_shard_map(monkeypatch):
    """Layers scanned over stacked f32 weights, column- and row-parallel weights under shard_map."""
    got, ref = scan_and_shard_map(TARGET, jnp.float32, 3, monkeypatch)
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * np.abs(b).max())


CASE = CASES[0]


@pytest.mark.parametrize("opts", [dict(batch_size=2), dict(batch_size=2, unroll=1), dict(batch_size=2, tp_degree=2)],
                         ids=str)
def test_f32_greedy_tokens_against_the_xla_path(saved_case, monkeypatch, opts):
    """A whole f32 model, decode and lm head through the kernel, against XLA's dots: logits to f32
    summation error, the same greedy tokens (both paths are deterministic)."""
    _, path = saved_case(CASE)
    load = dict(n_positions=[64], context_length_estimate=[16], progress=False, **opts)
    levels = LEVELS if opts == dict(batch_size=2) else LEVELS[-1:]  # every level once, the variants at the best
    assert_kernel_matches_xla(path, load, 2, CASE.vocab, levels, monkeypatch, rtol=1e-4)
