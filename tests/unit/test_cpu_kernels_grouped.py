"""nx-kernels-cpu's grouped kernel (s4, grouped s8, GGUF Q4_0 / Q4_1 / Q8_0 layouts) against the
pure-XLA path of `nx.ops.quant._grouped_matmul`, at every dispatch level this CPU runs, inside
jit and scan, the fallbacks where it does not apply, and greedy tokens of whole s4 models.

Tolerance: both paths round the activations into the same int8 terms and take the same exact
int32 dot per group; they differ only in the f32 sum over groups (XLA reduces ``[groups, m, n]``
in its order, the kernel accumulates steps of 32 or 64 values in lanes, then reduces the lanes;
the SIMD levels also add the unsigned-nibble offset's share as a separate f32 sum). Each such sum
of ~k / 32 products rounds to ~k / 32 * 2**-24 of the sum of its magnitudes, so the results agree
to ~1e-6 of the largest output; 1e-5 of it leaves a margin."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nx
from nx import ops
from nx.ops import cpu_kernels
from nx.ops import quant as qops
from nx.ops.quant import QuantizedWeight
from tests.cases.llama import CASES
from tests.conftest import left_padded

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=str(cpu_kernels.unavailable_reason()))

ORDER = ["scalar", "avx2", "avx512_vnni", "avx512_bf16"]
#: Every level this CPU runs for int8 (avx512_bf16 runs the int8 kernels as avx512_vnni, so it is left out)
LEVELS = [lv for lv in ORDER[: ORDER.index(cpu_kernels.isa() or "scalar") + 1] if lv != "avx512_bf16"]
TARGET = "nx_kernels_cpu_grouped_matmul"
#: [m, k, n, group_size]: SmolLM2-135M's projections, a slice of its lm head, and odd sizes: an
#: odd number of 32-value shares (AVX-512's half step), n not a multiple of 4, one output, more
#: groups than one scale load (16), groups of 64, 128, 512 and 1024.
SHAPES = [(1, 576, 960, 32), (2, 576, 576, 32), (8, 576, 1536, 32), (16, 1536, 576, 32), (3, 96, 37, 32),
          (5, 160, 6, 32), (1, 32, 1, 32), (4, 1088, 13, 32), (7, 576, 20, 64), (2, 640, 9, 128),
          (1, 1024, 5, 512), (3, 2048, 3, 1024)]
#: (bits, affine): s4 / Q4_0, Q4_1 / Q4_K (unsigned nibbles and offsets), grouped s8 / Q8_0, and
#: int8 with offsets (no GGUF type, but the weight class allows it).
KINDS = [(4, False), (4, True), (8, False), (8, True)]


def _weight(n, k, bits, gs, affine, f16, seed=0):
    rng = np.random.default_rng(seed)
    groups = k // gs
    if bits == 4:
        q = rng.integers(0, 256, (n, k // 2)).astype(np.uint8)  # every nibble, both orders
    else:
        q = rng.integers(-128, 128, (n, k)).astype(np.int8)  # -128 too (GGUF blocks may hold it)
    scale = rng.uniform(1e-3, 1e-1, (n, groups)).astype(np.float32)
    scale[0, 0] = 0.0  # an all-zero group
    zero = rng.uniform(-0.5, 0.5, (n, groups)).astype(np.float32) if affine else None
    dt = np.float16 if f16 else np.float32
    return QuantizedWeight(jnp.asarray(q), jnp.asarray(scale.astype(dt)),
                           zero=None if zero is None else jnp.asarray(zero.astype(dt)), bits=bits, group_size=gs)


def _x(m, k, seed=1):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.01, 100, (m, 1)).astype(np.float32)
    x[-1] = 0.0  # an all-zero row (padding) stays zero
    return x


def _off(monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "off")


def _xla_reference(monkeypatch, x, w):
    """`_grouped_matmul`'s XLA int8 path (for m <= group_size / 2), else its dequantized f32 dot."""
    _off(monkeypatch)
    ref = np.asarray(jax.jit(qops._grouped_matmul)(jnp.asarray(x), w))
    monkeypatch.delenv(cpu_kernels.ENV)
    return ref


def _close(got, ref):
    assert got.shape == ref.shape and got.dtype == np.float32
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
@pytest.mark.parametrize("kind", KINDS, ids=lambda k: f"s{k[0]}{'-affine' if k[1] else ''}")
@pytest.mark.parametrize("level", LEVELS)
def test_grouped_kernel_equals_the_xla_path(monkeypatch, level, kind, f16):
    import nx_kernels_cpu

    bits, affine = kind
    for m, k, n, gs in SHAPES:
        w = _weight(n, k, bits, gs, affine, f16)
        x = _x(m, k)
        got = np.asarray(jax.jit(lambda x, w: nx_kernels_cpu.grouped_matmul(
            x, w.q, w.scale, w.zero, bits=w.bits, group_size=w.group_size, level=level))(x, w))
        _close(got, _xla_reference(monkeypatch, x, w))
        assert not got[-1].any()  # an all-zero row (padding) stays zero
        if level == LEVELS[-1]:  # through nx.ops.quant as models call it, at the default level
            via_nx = np.asarray(jax.jit(qops.matmul)(jnp.asarray(x), w))
            np.testing.assert_array_equal(via_nx, got)


def test_threads_do_not_change_results():
    import nx_kernels_cpu

    w = _weight(3072, 576, 4, 32, False, True)
    x = _x(4, 576)
    f = [jax.jit(lambda x, t=t: nx_kernels_cpu.grouped_matmul(x, w.q, w.scale, bits=4, group_size=32, threads=t))
         for t in (0, 1)]
    np.testing.assert_array_equal(np.asarray(f[0](x)), np.asarray(f[1](x)))


def _lowered(x, w):
    return jax.jit(lambda x: ops.lm_head(x, w)).lower(x).as_text()


def test_dispatch_fallbacks_and_off_switch(monkeypatch):
    w = _weight(40, 96, 4, 32, False, False)
    x = _x(4, 96)
    assert TARGET in _lowered(x, w)  # on by default where the package runs
    for level in LEVELS:
        monkeypatch.setenv(cpu_kernels.ENV, level)
        assert TARGET in _lowered(x, w)
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    assert TARGET not in _lowered(x, w)
    monkeypatch.delenv(cpu_kernels.ENV)
    many = _x(cpu_kernels.MAX_ROWS + 1, 96)
    assert TARGET not in _lowered(many, w)  # prompts: XLA's dequantized dot
    accel = QuantizedWeight(w.q, w.scale, int8_dot=False, bits=4, group_size=32)
    assert TARGET not in _lowered(x, accel)  # the accelerators' conversion
    # group sizes the kernel does not take (GGUF Q6_K's 16; 96 does not tile 512) and bf16
    # scales stay on XLA's path, with its results
    for other in (_weight(40, 96, 8, 16, False, False), _weight(40, 192, 4, 96, False, False),
                  QuantizedWeight(w.q, w.scale.astype(jnp.bfloat16), bits=4, group_size=32)):
        xo = _x(3, other.shape[1])
        assert TARGET not in _lowered(xo, other)
        got = np.asarray(jax.jit(qops.matmul)(jnp.asarray(xo), other))
        _close(got, _xla_reference(monkeypatch, xo, other))


def test_inside_scan(monkeypatch):
    """Layers scanned over stacked s4 weights (the decoder's layer scan)."""
    x = _x(3, 128, seed=3)
    layers = [_weight(128, 128, 4, 32, False, True, seed=s) for s in range(3)]
    stacked = jax.tree.map(lambda *a: jnp.stack(a), *layers)

    def run(x, stacked):
        def body(h, w):
            return jnp.tanh(qops.matmul(h, w)), None

        return jax.lax.scan(body, x, stacked)[0]

    assert TARGET in jax.jit(run).lower(x, stacked).as_text()
    got = np.asarray(jax.jit(run)(x, stacked))
    _off(monkeypatch)
    ref = np.asarray(jax.jit(run)(x, stacked))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


CASE = CASES[0]


@pytest.mark.parametrize("quant", ["s4", nx.QuantizationConfig("s8", group_size=32)], ids=["s4", "s8-g32"])
def test_greedy_tokens_equal_the_xla_path(saved_case, monkeypatch, quant):
    """A whole grouped model (decode programs through the kernel) against the same model on XLA's
    path, at every level: the same greedy tokens, logits to f32 rounding of the group sums."""
    _, path = saved_case(CASE)
    load = dict(n_positions=[64], context_length_estimate=[16], progress=False, quant=quant, batch_size=2)
    ids, mask = left_padded([9, 5], CASE.vocab, seed=11)

    def greedy():
        model = nx.load("llama", path, **load)
        tokens = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]).numpy()
        return tokens, model.logits(ids, mask)

    _off(monkeypatch)
    ref_tokens, ref_logits = greedy()
    for level in LEVELS:
        monkeypatch.setenv(cpu_kernels.ENV, level)
        tokens, logits = greedy()
        np.testing.assert_array_equal(tokens, ref_tokens)
        np.testing.assert_allclose(logits, ref_logits, rtol=1e-4, atol=1e-4 * np.abs(ref_logits).max())
