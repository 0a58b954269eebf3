"""nx-kernels-cpu against the pure-XLA int8 path: exact int32 sums, equal f32 results, at every
dispatch level this CPU runs, inside jit, scan and shard_map, and greedy tokens of whole models."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec

import nx
from nx import ops
from nx.ops import cpu_kernels
from nx.ops import quant as qops
from nx.ops.quant import QuantizedWeight
from nx.quant import quantize
from tests.cases.llama import CASES
from tests.conftest import assert_kernel_matches_xla

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=str(cpu_kernels.unavailable_reason()))

ORDER = ["scalar", "avx2", "avx512_vnni", "avx512_bf16"]
#: Every level this CPU runs (the package lowers a level above the CPU's to it; avx512_bf16 runs the s8
#: kernels as avx512_vnni).
LEVELS = ORDER[: ORDER.index(cpu_kernels.isa() or "scalar") + 1]
#: [m, k, n]: SmolLM2-135M's projections (qkv, o, up, down, a slice of the lm head) and odd sizes
#: (k not a multiple of 32 or 64, n not of 4) for the vector loops' tails.
SHAPES = [(1, 576, 960), (2, 576, 576), (8, 576, 3072), (16, 1536, 576), (1, 576, 4096), (3, 100, 37),
          (5, 33, 6), (1, 1, 1), (4, 64, 130)]


def _xla(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "off")


def _random(m, k, n, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.01, 100, (m, 1)).astype(np.float32)
    q = rng.integers(-128, 128, (n, k)).astype(np.int8)  # -128 too: GGUF blocks may hold it
    scale = rng.uniform(1e-3, 1e-1, n).astype(np.float32)
    return x, q, scale


@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int8_dots_are_exact(level, shape):
    import nx_kernels_cpu

    m, k, n = shape
    rng = np.random.default_rng(1)
    a = rng.integers(-127, 128, (2 * m, k)).astype(np.int8)
    a[0, : min(k, 64)] = 127  # the extremes: products 127 * -128 summed in the same lane
    _, q, _ = _random(m, k, n)
    q[0, : min(k, 64)] = -128
    got = np.asarray(jax.jit(lambda a, q: nx_kernels_cpu.s8_dot(a, q, level=level))(a, q))
    assert got.dtype == np.int32
    np.testing.assert_array_equal(got, a.astype(np.int64) @ q.astype(np.int64).T)


@pytest.mark.parametrize("threads", [0, 1])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matmul_equals_the_xla_path(monkeypatch, level, shape, threads):
    """The kernel rounds the activation terms and the epilogue as XLA:CPU does: equal to ~1 ulp."""
    import nx_kernels_cpu

    x, q, scale = _random(*shape)
    x[-1] = 0.0  # an all-zero row (padding) stays zero
    w = QuantizedWeight(jnp.asarray(q), jnp.asarray(scale))
    got = np.asarray(jax.jit(lambda x: nx_kernels_cpu.s8_matmul(x, w.q, w.scale, level=level, threads=threads))(x))
    _xla(monkeypatch)
    ref = np.asarray(jax.jit(qops.matmul)(jnp.asarray(x), w))
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-6 * np.abs(ref).max())
    assert not got[-1].any()


#: Token rows through the kernel: every decode batch 1-16, prompts (up to `cpu_kernels.MAX_ROWS`) and
#: an odd one; [k, n] = [2100, 130]: k spans (2048 + a tail), several token tiles and weight chunks
#: (n not a multiple of the register tiles' 4 rows).
ROWS = [*range(1, 17), 17, 64, 77, 128, 256, 2048]


@pytest.mark.parametrize("level", LEVELS)
def test_every_row_count_equals_the_xla_path_bit_for_bit(monkeypatch, level):
    """Register tiles, cache blocking and the vector rounding keep the XLA path's results exactly."""
    import nx_kernels_cpu

    x, q, scale = _random(max(ROWS), 2100, 130, seed=5)
    w = QuantizedWeight(jnp.asarray(q), jnp.asarray(scale))

    def kernel(threads):
        return jax.jit(lambda x: nx_kernels_cpu.s8_matmul(x, w.q, w.scale, level=level, threads=threads))

    # one thread: its rows in several weight chunks; two: the rows split between them
    got = {(m, threads): np.asarray(kernel(threads)(x[:m])) for threads in (0, 1) for m in ROWS}
    _xla(monkeypatch)
    xla = jax.jit(qops.matmul)
    for m in ROWS:
        ref = np.asarray(xla(jnp.asarray(x[:m]), w))
        for threads in (0, 1):
            np.testing.assert_array_equal(got[m, threads], ref, err_msg=f"{m} rows, threads {threads}")


def _lowered(x, w):
    return jax.jit(lambda x: ops.lm_head(x, w)).lower(x).as_text()


def test_nx_ops_dispatch_and_off_switch(monkeypatch):
    x, q, scale = _random(4, 64, 32)
    w = QuantizedWeight(*quantize(np.asarray(q, np.float32) * scale[:, None]))
    target = "nx_kernels_cpu_s8_matmul"
    assert target in _lowered(x, w)  # on by default where the package runs
    accel = QuantizedWeight(w.q, w.scale, int8_dot=False)  # the accelerators' conversion
    assert target not in _lowered(x, accel)
    for level in ["auto", *LEVELS]:  # prompts too at the AVX-512 levels; longer ones stay on XLA's dots
        monkeypatch.setenv(cpu_kernels.ENV, level)
        vnni = (cpu_kernels.isa() if level == "auto" else level).startswith("avx512")
        limit = cpu_kernels.MAX_ROWS if vnni else cpu_kernels.AVX2_MAX_ROWS
        assert target in _lowered(x, w) and target in _lowered(np.zeros((limit, 64), np.float32), w)
        assert (target in _lowered(np.zeros((128, 64), np.float32), w)) == vnni
        assert target not in _lowered(np.zeros((limit + 1, 64), np.float32), w)
    assert cpu_kernels.describe() == f"{cpu_kernels.package()}, {LEVELS[-1]}"  # nx bench's line
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    assert target not in _lowered(x, w) and "xi32>" in _lowered(x, w)
    assert cpu_kernels.describe().startswith("off (NX_CPU_KERNELS=off")
    monkeypatch.setenv(cpu_kernels.ENV, "fast")
    with pytest.raises(nx.ConfigError, match="NX_CPU_KERNELS='fast'"):
        _lowered(x, w)
    monkeypatch.setenv(cpu_kernels.ENV, "auto")
    monkeypatch.setenv(cpu_kernels.THREADS_ENV, "-1")
    with pytest.raises(nx.ConfigError, match="NX_CPU_KERNELS_THREADS"):
        _lowered(x, w)


def test_inside_scan_and_shard_map(monkeypatch):
    """Layers scanned over stacked weights, and a column-parallel weight under shard_map (2 devices)."""
    x, _, _ = _random(2, 128, 1, seed=3)
    rng = np.random.default_rng(4)
    layers = [QuantizedWeight(*quantize(rng.standard_normal((128, 128)).astype(np.float32))) for _ in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)

    def run(x, stacked):
        def body(h, w):
            return jnp.tanh(qops.matmul(h, w)), None

        return jax.lax.scan(body, x, stacked)[0]

    mesh = Mesh(np.array(jax.devices()[:2]), ("tp",))

    def sharded(x, w):
        f = jax.shard_map(lambda x, w: qops.matmul(x, w), mesh=mesh, in_specs=(PartitionSpec(), PartitionSpec("tp")),
                          out_specs=PartitionSpec(None, "tp"))
        return f(x, w)

    got = [np.asarray(jax.jit(run)(x, stacked)), np.asarray(jax.jit(sharded)(x, layers[0]))]
    assert "nx_kernels_cpu_s8_matmul" in jax.jit(sharded).lower(x, layers[0]).as_text()
    _xla(monkeypatch)
    ref = [np.asarray(jax.jit(run)(x, stacked)), np.asarray(jax.jit(sharded)(x, layers[0]))]
    for a, b in zip(got, ref):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6 * np.abs(b).max())


CASE = CASES[0]


@pytest.mark.parametrize(
    "opts", [dict(batch_size=2), dict(batch_size=2, unroll=1), dict(batch_size=2, amp="bf16"), dict(tp_degree=2)],
    ids=str,
)
def test_greedy_tokens_equal_the_xla_path(saved_case, monkeypatch, opts):
    """A whole s8 model (decode and prompt programs through the kernel) against the same model on XLA's
    dots: the same tokens; logits to 1e-4, as each matmul is exact but XLA contracts its last product
    with the residual add after it (one rounding fewer), which a custom call's result cannot share."""
    _, path = saved_case(CASE)
    load = dict(n_positions=[64], context_length_estimate=[16], progress=False, quant="s8", **opts)
    levels = LEVELS if opts == dict(batch_size=2) else LEVELS[-1:]  # every level once, the variants at the best
    assert_kernel_matches_xla(path, load, opts.get("batch_size", 1), CASE.vocab, levels, monkeypatch, rtol=1e-4)


def test_artifacts_record_the_kernels(saved_case, tmp_path, monkeypatch):
    """An artifact whose programs call the kernels names the package; loading it where another (or no)
    release is installed is an ArtifactError before any program is deserialized."""
    import json

    _, path = saved_case(CASE)
    model = nx.load("llama", path, n_positions=[32], context_length_estimate=[16], progress=False, quant="s8")
    model.save(tmp_path / "art")
    env = json.loads((tmp_path / "art" / "nx-artifact.json").read_text())["environment"]
    assert env["cpu_kernels"] == cpu_kernels.package()
    monkeypatch.setattr(cpu_kernels, "package", lambda: None)  # this process as if it lacked the package
    with pytest.raises(nx.ArtifactError, match="install nx-kernels-cpu=="):
        nx.load(tmp_path / "art", progress=False)
