"""nx-kernels-cpu's bf16 kernel (``amp="bf16"`` decode and prompt matmuls) against an f64 reference and the
pure-XLA path: at every dispatch level this CPU runs, inside jit, scan and shard_map, only on the cpu
platform, and greedy tokens of a whole bf16 model.

Tolerance: the kernel's products are exact (bf16 x bf16 fits in f32; f32 x bf16 inside a fused
multiply-add) and it sums k of them in f32 in some order, so its error is within the worst-case
bound of f32 summation, ``k * 2**-24 * (|x| @ |w|.T)`` (XLA's as well); sums that are exact in f32
(small integers) come out bit for bit."""

from __future__ import annotations

import importlib
from functools import partial

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
#: Every level this CPU runs (avx512_vnni: AVX-512F without the bf16 instructions).
LEVELS = ORDER[: ORDER.index(cpu_kernels.isa() or "scalar") + 1]
#: [m, k, n]: SmolLM2-135M's projections (qkv, o, up, down, a slice of the lm head) and odd sizes
#: (k not a multiple of 16 or 32 for the vector loops' tails, m not a multiple of the row tiles).
SHAPES = [(1, 576, 960), (2, 576, 576), (8, 576, 3072), (16, 1536, 576), (1, 576, 4096), (3, 100, 37),
          (5, 33, 6), (1, 1, 1), (4, 64, 130), (15, 47, 9), (7, 200, 17)]
TARGET = "nx_kernels_cpu_bf16_matmul"
U = 2.0**-24


def _random(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.01, 100, (m, 1)).astype(np.float32)
    w = rng.standard_normal((n, k)).astype(np.float32) * rng.uniform(0.01, 1, (n, 1)).astype(np.float32)
    return x, jnp.asarray(w, jnp.bfloat16)


def _f64(a):
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _check(got, x, w, factor=1.0):
    """|got - exact| within `factor` times the f32 summation bound."""
    xf, wf = _f64(x), _f64(w)
    exact, bound = xf @ wf.T, np.abs(xf) @ np.abs(wf).T
    k = xf.shape[1]
    err = np.abs(np.asarray(got, np.float64) - exact)
    assert (err <= factor * k * U * bound + 1e-30).all(), float((err / (k * U * bound + 1e-30)).max())


@pytest.mark.parametrize("xdtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matmul_within_f32_summation_error(level, shape, xdtype):
    import nx_kernels_cpu

    x, w = _random(*shape)
    x = jnp.asarray(x, xdtype)
    outs = [np.asarray(jax.jit(lambda x, w, t=t: nx_kernels_cpu.bf16_matmul(x, w, level=level, threads=t))(x, w))
            for t in (0, 1)]
    assert outs[0].shape == (shape[0], shape[2]) and outs[0].dtype == np.float32
    np.testing.assert_array_equal(outs[0], outs[1])  # each output summed by one thread, in one order
    _check(outs[0], x, w)


@pytest.mark.parametrize("xdtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("m", range(1, 17))
def test_every_row_count_up_to_16(level, m, xdtype):
    """Every row count nx sends (row tiles of every width, x-row blocks of unequal sizes), k past one
    k-span of the tiles (1024) with a partial last block, n not a multiple of the 4-row tiles."""
    import nx_kernels_cpu

    x, w = _random(m, 1100, 37, seed=m)
    x = jnp.asarray(x, xdtype)
    outs = [np.asarray(jax.jit(lambda x, w, t=t: nx_kernels_cpu.bf16_matmul(x, w, level=level, threads=t))(x, w))
            for t in (0, 1)]
    np.testing.assert_array_equal(outs[0], outs[1])
    _check(outs[0], x, w)


#: [m, k, n] for the prompt panels (from 16 rows at avx512_bf16 with bf16 x): whole 32-row panels and
#: a 16-row last one, rows past m in both, k odd and not a multiple of 32, n not a multiple of 12.
PANEL_SHAPES = [(16, 576, 960), (17, 576, 37), (31, 100, 12), (32, 1536, 25), (33, 33, 13), (48, 64, 11),
                (100, 77, 130), (128, 576, 576)]


@pytest.mark.skipif("avx512_bf16" not in LEVELS, reason="the prompt panels run at the avx512_bf16 level")
@pytest.mark.parametrize("shape", PANEL_SHAPES, ids=str)
def test_prompt_panels_within_f32_summation_error(shape):
    """Prompt chunks (the panels' outer products): the same bound, one thread or several alike."""
    import nx_kernels_cpu

    x, w = _random(*shape, seed=shape[0])
    x = jnp.asarray(x, jnp.bfloat16)
    outs = [np.asarray(jax.jit(lambda x, w, t=t: nx_kernels_cpu.bf16_matmul(x, w, threads=t))(x, w)) for t in (0, 1)]
    assert outs[0].shape == (shape[0], shape[2]) and outs[0].dtype == np.float32
    np.testing.assert_array_equal(outs[0], outs[1])
    _check(outs[0], x, w)


@pytest.mark.parametrize("xdtype", ["bfloat16", "float32"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("m", [1, 3, 8, 16, 33, 128])
def test_bf16_results_are_the_f32_sums_rounded(level, m, xdtype):
    """``dtype=bf16``: the kernel's own f32 sums rounded to nearest even (ml_dtypes' rounding, as
    XLA's convert), bit for bit, on every path (row tiles, panels, the lower levels)."""
    import ml_dtypes
    import nx_kernels_cpu

    x, w = _random(m, 200, 61, seed=m)
    x = jnp.asarray(x, xdtype)
    f32 = np.asarray(jax.jit(lambda x, w: nx_kernels_cpu.bf16_matmul(x, w, level=level))(x, w))
    got = np.asarray(jax.jit(lambda x, w: nx_kernels_cpu.bf16_matmul(x, w, level=level, dtype=jnp.bfloat16))(x, w))
    assert got.dtype == jnp.bfloat16 and got.shape == (m, 61)
    np.testing.assert_array_equal(got.view(np.uint16), f32.astype(ml_dtypes.bfloat16).view(np.uint16))


def test_bf16_results_keep_nan_and_inf():
    import nx_kernels_cpu

    for m in (3, 40):  # row tiles, panels
        x = jnp.asarray([[np.nan, 1.0], [np.inf, 1.0], [1e38, 1e38]] * (m // 3) + [[1.0, 1.0]] * (m % 3), jnp.bfloat16)
        w = jnp.asarray([[1.0, 0.0], [1.0, 1.0]], jnp.bfloat16)
        got = np.asarray(nx_kernels_cpu.bf16_matmul(x, w, dtype=jnp.bfloat16), np.float32)
        assert np.isnan(got[0]).all() and (got[1] == np.inf).all()
        np.testing.assert_allclose(got[2], [1e38, 2e38], rtol=2**-8)


def test_result_dtype_is_checked():
    import nx_kernels_cpu

    with pytest.raises(ValueError, match="float32 or bfloat16"):
        nx_kernels_cpu.bf16_matmul(jnp.zeros((1, 4), jnp.bfloat16), jnp.zeros((2, 4), jnp.bfloat16), dtype=jnp.float16)


def _glu_reference(x, w):
    """silu(gate) * up rounded as nx's XLA path rounds it, from exact (f64) sums: each half's sums
    to bf16, silu in f32 to bf16, the product in f32 to bf16."""
    import ml_dtypes

    bf = ml_dtypes.bfloat16
    h = (_f64(x) @ _f64(w).T).astype(np.float32).astype(bf).astype(np.float32)
    g, u = np.split(h, 2, axis=-1)
    a = (g * (np.float32(1) / (np.float32(1) + np.exp(-g)))).astype(bf).astype(np.float32)
    return (a * u).astype(bf).astype(np.float32)


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", [(1, 576, 3072), (8, 100, 26), (16, 576, 3072), (33, 77, 14), (128, 64, 30)],
                         ids=str)
def test_glu_is_silu_of_the_gate_times_the_up(level, shape):
    """``glu="silu"`` (a gated MLP's first layer): the XLA path's roundings of silu(gate) * up from
    sums within f32 summation error, so within 2 bf16 ulps of the reference from exact sums (a sum
    or silu that lies at a rounding boundary may round either way), and equal in most places.
    Output columns not a multiple of the panels' 6 per tile, every row tail; one thread or several
    alike."""
    import nx_kernels_cpu

    m, k, n = shape
    x, w = _random(m, k, n, seed=n)
    x = jnp.asarray(x / np.abs(x).max(axis=1, keepdims=True), jnp.bfloat16)  # sums of a few units: silu's curve
    outs = [np.asarray(jax.jit(lambda x, w, t=t: nx_kernels_cpu.bf16_matmul(
        x, w, level=level, threads=t, dtype=jnp.bfloat16, glu="silu"))(x, w)) for t in (0, 1)]
    assert outs[0].shape == (m, n // 2) and outs[0].dtype == jnp.bfloat16
    np.testing.assert_array_equal(outs[0].view(np.uint16), outs[1].view(np.uint16))
    got, ref = outs[0].astype(np.float32), _glu_reference(x, w)
    np.testing.assert_allclose(got, ref, rtol=2**-6, atol=2**-6 * np.abs(ref).max())
    assert (got == ref).mean() > 0.95


def test_glu_keeps_nan_and_large_gates():
    """silu of a large negative gate is 0 (exp(-g) overflows), of a large positive one the gate."""
    import nx_kernels_cpu

    for m in (4, 40):  # row tiles, panels
        gates = [[np.nan], [-1e30], [1e30], [-3.0]]
        x = jnp.asarray([gates[i % 4] + [1.0] for i in range(m)], jnp.bfloat16)
        w = jnp.asarray([[1.0, 0.0], [0.0, 1.0]], jnp.bfloat16)  # gate = x[:, 0], up = x[:, 1]
        got = np.asarray(nx_kernels_cpu.bf16_matmul(x, w, dtype=jnp.bfloat16, glu="silu"), np.float32)[:, 0]
        assert np.isnan(got[0]) and got[1] == 0 and np.isclose(got[2], 1e30, rtol=2**-7)
        np.testing.assert_allclose(got[3], -3.0 / (1 + np.exp(3.0)), rtol=2**-7)


def test_glu_arguments_are_checked():
    import nx_kernels_cpu

    x, w = jnp.zeros((16, 4), jnp.bfloat16), jnp.zeros((6, 4), jnp.bfloat16)
    for kw in (dict(glu="gelu", dtype=jnp.bfloat16), dict(glu="silu"), dict(glu="silu", dtype=jnp.bfloat16, w=w[:5])):
        with pytest.raises(ValueError, match="glu"):
            nx_kernels_cpu.bf16_matmul(x, kw.pop("w", w), **kw)


@pytest.mark.parametrize("rows", [1, 16, 100, cpu_kernels.BF16_MAX_ROWS])
@pytest.mark.parametrize("bias", [False, True])
def test_gated_linear_equals_the_xla_path(monkeypatch, rows, bias):
    """`nx.ops.linear.gated_linear` (a gated MLP's first layer) through the kernel (prompt rows) and
    on XLA's path: the same roundings, so equal but where a sum lies at a rounding boundary."""
    x, w = _random(rows, 576, 400, seed=rows)
    x = jnp.asarray(x / np.abs(x).max(axis=1, keepdims=True), jnp.bfloat16).reshape(rows, 1, 576)
    p = {"w": w, "b": jnp.asarray(np.linspace(-1, 1, 400), jnp.bfloat16) if bias else None}
    f = jax.jit(lambda x, p: linear.gated_linear(x, p, "silu"))
    glu = "glu = 1" in f.trace(x, p).lower().as_text()
    assert glu == (not bias and rows >= cpu_kernels.BF16_GLU_MIN_ROWS and "avx512_bf16" in LEVELS)
    got = np.asarray(f(x, p), np.float32)
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    ref = np.asarray(jax.jit(lambda x, p: linear.gated_linear(x, p, "silu"))(x, p), np.float32)
    assert got.shape == ref.shape == (rows, 1, 200)
    np.testing.assert_allclose(got, ref, rtol=2**-6, atol=2**-6 * np.abs(ref).max())
    assert (got == ref).mean() > 0.95


@pytest.mark.parametrize("level", LEVELS)
def test_exact_sums_are_exact(level):
    """Small integers: every partial sum is exact in f32, whatever the order: bit for bit."""
    import nx_kernels_cpu

    assert_exact_integer_sums(nx_kernels_cpu.bf16_matmul, jnp.bfloat16, 1000, level)


@pytest.mark.parametrize("rows", sorted({1, 2, 3, 4, 5, 8, 13, 16, 40, cpu_kernels.BF16_MAX_ROWS}))
@pytest.mark.parametrize("level", LEVELS)
def test_project_equals_the_xla_path(monkeypatch, level, rows):
    """`nx.ops.linear.project` (bf16 in, f32 out) with the kernel and on XLA's dots: both within f32
    summation error of the exact sums, so within twice that of each other."""
    x, w = _random(rows, 576, 1000, seed=rows)
    x = jnp.asarray(x, jnp.bfloat16).reshape(rows, 1, 576)
    f = jax.jit(lambda x, w: linear.project(x, w, jnp.float32))
    monkeypatch.setenv(cpu_kernels.ENV, level)
    got = np.asarray(f(x, w))
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    ref = np.asarray(jax.jit(lambda x, w: linear.project(x, w, jnp.float32))(x, w))
    assert got.shape == ref.shape == (rows, 1, 1000)
    _check(got.reshape(rows, -1), x.reshape(rows, -1), w)
    _check(ref.reshape(rows, -1), x.reshape(rows, -1), w)
    xf, wf = _f64(x.reshape(rows, -1)), _f64(w)
    assert (np.abs(got - ref).reshape(rows, -1) <= 2 * 576 * U * (np.abs(xf) @ np.abs(wf).T)).all()


@pytest.mark.parametrize("rows", sorted({1, 8, 16, 100, cpu_kernels.BF16_MAX_ROWS}))
def test_project_to_bf16_equals_the_xla_path(monkeypatch, rows):
    """`nx.ops.linear.project` to bf16 (the layers of ``amp="bf16"``; the kernel rounds as it stores,
    prompt chunks run its panels) against XLA's dot and rounding: both round
    sums within f32 summation error of each other, so they differ by at most one bf16 ulp where a
    sum lies that close to a rounding boundary, and are equal elsewhere."""
    x, w = _random(rows, 576, 300, seed=rows)
    x = jnp.asarray(x, jnp.bfloat16).reshape(rows, 1, 576)
    f = jax.jit(lambda x, w: linear.project(x, w, jnp.bfloat16))
    assert TARGET in f.trace(x, w).lower().as_text()
    got = np.asarray(f(x, w), np.float32)
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    ref = np.asarray(jax.jit(lambda x, w: linear.project(x, w, jnp.bfloat16))(x, w), np.float32)
    assert got.shape == ref.shape == (rows, 1, 300)
    np.testing.assert_allclose(got, ref, rtol=2**-7, atol=0)
    assert (got == ref).mean() > 0.99


def _lowered(x, w, dtype=jnp.bfloat16, **kw):
    return jax.jit(lambda x, w: linear.project(x, w, dtype)).trace(x, w).lower(**kw).as_text()


def test_dispatch_and_off_switch(monkeypatch):
    x, w = _random(4, 64, 32)
    x = jnp.asarray(x, jnp.bfloat16)
    assert TARGET in _lowered(x, w)  # on by default where the package runs
    assert TARGET in _lowered(x.astype(jnp.float32), w)  # f32 activations, bf16 weight
    assert TARGET not in _lowered(x, w.astype(jnp.float32))  # f32 weights stay on XLA's dots
    for level in LEVELS[1:]:  # the row limit at each level (vdpbf16ps tiles take prompt chunks)
        monkeypatch.setenv(cpu_kernels.ENV, level)
        limit = cpu_kernels.BF16_MAX_ROWS if level == "avx512_bf16" else cpu_kernels.BF16_NARROW_MAX_ROWS
        many = jnp.zeros((limit + 1, 64), jnp.bfloat16)
        assert TARGET not in _lowered(many, w)  # larger batches and prompts stay on XLA's GEMM
        rows = jnp.zeros((2, limit // 2, 64), jnp.bfloat16)
        assert TARGET in _lowered(rows, w)  # the row limit in any leading shape
        f32 = jnp.zeros((cpu_kernels.BF16_NARROW_MAX_ROWS + 1, 64), jnp.float32)
        assert TARGET not in _lowered(f32, w)  # f32 activations: the narrow limit at every level
        f32_out = partial(_lowered, dtype=jnp.float32)  # an f32 result (lm heads, tensor-parallel sums)
        assert TARGET in f32_out(jnp.zeros((limit, 64), jnp.bfloat16), w)
        assert TARGET not in f32_out(many, w)
    monkeypatch.delenv(cpu_kernels.ENV)
    assert_chosen_when_lowered(TARGET, _lowered, x, w, LEVELS, monkeypatch)


@pytest.mark.parametrize("platform", ["cuda", "rocm", "tpu"])
def test_other_platforms_lower_the_xla_path(platform):
    """A program exported for an accelerator never calls the cpu-only FFI target."""
    x, w = _random(1, 64, 32)
    assert_xla_off_the_cpu(TARGET, jnp.asarray(x, jnp.bfloat16), w, platform)


def test_inside_scan_and_shard_map(monkeypatch):
    """Layers scanned over stacked bf16 weights, column- and row-parallel weights under shard_map."""
    got, ref = scan_and_shard_map(TARGET, jnp.bfloat16, 2, monkeypatch)
    for a, b in zip(got, ref):
        # bf16 roundings between layers may flip by one ulp (2**-8 relative) where the sums differ
        np.testing.assert_allclose(a, b, rtol=2**-7, atol=2**-7 * np.abs(b).max())
    np.testing.assert_allclose(got[1], ref[1], rtol=1e-5, atol=1e-5 * np.abs(ref[1]).max())  # f32 out


CASE = CASES[0]


@pytest.mark.parametrize("opts", [dict(batch_size=2), dict(batch_size=2, unroll=1), dict(tp_degree=2)], ids=str)
def test_bf16_greedy_tokens_against_the_xla_path(saved_case, monkeypatch, opts):
    """A whole amp="bf16" model, decode through the kernel, against XLA's dots. Sums in another order
    can flip a bf16 rounding, so logits agree to bf16 precision, not bit for bit, and greedy tokens
    can part at a near-tie: on this model and these prompts they are equal at every level (both
    paths are deterministic); SmolLM2 with random prompts parted after 7-35 tokens (BENCHMARKS.md,
    "bf16 CPU kernel"), while its agreement with f32 stayed that of XLA's bf16."""
    _, path = saved_case(CASE)
    load = dict(n_positions=[64], context_length_estimate=[16], progress=False, amp="bf16", **opts)
    levels = LEVELS if opts == dict(batch_size=2) else LEVELS[-1:]  # every level once, the variants at the best
    assert_kernel_matches_xla(path, load, opts.get("batch_size", 1), CASE.vocab, levels, monkeypatch, rtol=0.05)
