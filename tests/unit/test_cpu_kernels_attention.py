"""nx-kernels-cpu's decode and prompt attention kernels against an f64 reference and the pure-XLA
path (`nx.ops.attention.attend` over `cache_windows`): at every level they run (AVX-512 and the
scalar loops), f32 and bf16 caches, query groups 1..9 (the decode kernel's chunks of 4 and their
tails), prompts of several tokens (the prompt kernel's tiles of 12 and their tails, causal ranges
per tile, blocked XLA prompts), head dims that are and are not whole vectors, windows shorter than
the cache with vector tails, padded and fully masked rows, one thread or the pool alike; positions
outside the masks unread; `attend_cache` chooses each only where it applies, and programs for
other platforms keep XLA's dots.

Tolerance: scores and weighted values are f32 sums in another order than XLA's and exp is a
polynomial, so the outputs (weighted means of the values) agree to a few f32 ulps of max|v|."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nx.ops import attention, cpu_kernels

pytestmark = pytest.mark.skipif(not cpu_kernels.available(), reason=str(cpu_kernels.unavailable_reason()))

TARGET = "nx_kernels_cpu_decode_attention"
PROMPT_TARGET = "nx_kernels_cpu_prompt_attention"
LEVELS = ["scalar"] + (["avx512_vnni"] if (cpu_kernels.isa() or "").startswith("avx512") else [])
#: (batch, tokens, kv heads, queries per kv head, head dim, positions, window)
SHAPES = [
    (1, 1, 3, 3, 64, 256, 256),  # SmolLM2 at batch 1, the whole cache
    (2, 1, 8, 4, 64, 96, 70),  # the 1B shape's groups, a window with a vector tail
    (3, 1, 2, 9, 16, 48, 33),  # 9 queries: chunks of 4, 4 and 1
    (2, 2, 1, 3, 32, 40, 17),  # two tokens a row (queries 6: chunks of 4 and 2)
    (1, 1, 2, 2, 24, 20, 5),  # a head dim that is no whole vector: the scalar loops at every level
    (1, 1, 1, 1, 80, 16, 1),  # one position
]
#: prompts: several tokens a row
PROMPT_SHAPES = [
    (1, 40, 3, 3, 64, 128, 96),  # SmolLM2's heads: 120 queries, 10 tiles of 12
    (2, 37, 2, 2, 32, 128, 100),  # 74 queries a row: 6 tiles and a tail of 2, a window with a vector tail
    (1, 120, 1, 3, 64, 256, 240),  # 360 queries: causal ranges from a few vectors to the window
    (2, 5, 1, 3, 24, 20, 12),  # a head dim that is no whole vector: the scalar loops at every level
]


def _kernel(name):
    import nx_kernels_cpu

    return getattr(nx_kernels_cpu, name)


def _case(shape, bf16: bool, seed: int = 0):
    b, t, kvh, g, d, p, w = shape
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((kvh * b, g * t, d)).astype(np.float32)
    k = rng.standard_normal((kvh * b, d, p)).astype(np.float32)
    v = (rng.standard_normal((kvh * b, p, d)) * 3).astype(np.float32)
    if bf16:  # values a bf16 cache can hold
        k, v = (np.asarray(jnp.asarray(a, jnp.bfloat16).astype(jnp.float32)) for a in (k, v))
    pad = rng.integers(0, max(1, w // 3), b)
    slot = rng.integers(np.maximum(pad, w // 2), w - t + 1, b) if w > t else np.zeros(b, int)
    mask = np.array(attention.causal_padding_mask(jnp.asarray(slot, jnp.int32), jnp.asarray(pad, jnp.int32), t, w))
    if b > 1 and w > 1:
        mask[-1, 0, :] = False  # a fully masked query: uniform weights, as XLA's path gives
    return q, k, v, mask


def _reference(q, k, v, mask, scale, bf16):
    """The kernel's contract in f64 (weights rounded to bf16 for bf16 caches, as XLA's path rounds them)."""
    b, t, w = mask.shape
    r, j, d = q.shape
    s = np.einsum("rjd,rdp->rjp", q.astype(np.float64), k[:, :, :w].astype(np.float64)) * scale
    m = mask[np.arange(r) % b][:, np.arange(j) % t]
    s = np.where(m, s, -1e30)
    e = np.exp(s - s.max(-1, keepdims=True))
    total = e.sum(-1, keepdims=True)
    if bf16:
        e = np.asarray(jnp.asarray(e.astype(np.float32), jnp.bfloat16).astype(jnp.float32), np.float64)
    return np.einsum("rjp,rpd->rjd", e, v[:, :w].astype(np.float64)) / total


CASES = [("decode_attention", s) for s in SHAPES] + [("prompt_attention", s) for s in SHAPES + PROMPT_SHAPES]


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("level", LEVELS)
@pytest.mark.parametrize("kernel,shape", CASES, ids=str)
def test_kernel_matches_the_f64_contract(kernel, shape, level, bf16):
    q, k, v, mask = _case(shape, bf16, seed=sum(shape))
    dt = jnp.bfloat16 if bf16 else jnp.float32
    kc, vc = jnp.asarray(k, dt), jnp.asarray(v, dt)
    fn = _kernel(kernel)
    f = jax.jit(lambda q, k, v, m, t: fn(q, k, v, m, scale=0.125, level=level, threads=t), static_argnums=4)
    outs = [np.asarray(f(q, kc, vc, mask, t)) for t in (0, 1)]
    assert outs[0].shape == q.shape and outs[0].dtype == np.float32
    np.testing.assert_array_equal(outs[0], outs[1])  # each cache row (tile) by one thread, in one order
    ref = _reference(q, k, v, mask, 0.125, bf16)
    # bf16 weights: the kernel's e and the f64 one may round to neighbouring bf16 values (2**-8)
    tol = (2**-7 if bf16 else 2e-6) * np.abs(v).max()
    np.testing.assert_allclose(outs[0], ref, rtol=0, atol=tol)


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("level", LEVELS)
def test_kernel_reads_only_the_live_positions(level, bf16):
    """Rows read only the positions their masks allow (widened to vectors of 16): NaN in a cache's
    positions outside them leaves the output finite and equal to the clean cache's, bit for bit."""
    import nx_kernels_cpu

    shape = (3, 1, 2, 3, 32, 160, 128)
    q, k, v, _ = _case(shape, bf16, seed=7)
    b, w = shape[0], shape[-1]
    slot, pad = np.array([69, 127, 20]), np.array([35, 0, 20])  # live: [32, 80), [0, 128), [16, 32)
    mask = np.array(attention.causal_padding_mask(jnp.asarray(slot, jnp.int32), jnp.asarray(pad, jnp.int32), 1, w))
    dt = jnp.bfloat16 if bf16 else jnp.float32
    f = jax.jit(lambda q, k, v, m: nx_kernels_cpu.decode_attention(q, k, v, m, scale=0.125, level=level, threads=0))
    clean = np.asarray(f(q, jnp.asarray(k, dt), jnp.asarray(v, dt), mask))
    dirty_k, dirty_v = k.copy(), v.copy()
    for r in range(k.shape[0]):
        lo, hi = {0: (32, 80), 1: (0, 128), 2: (16, 32)}[r % b]
        dirty_k[r, :, :lo] = dirty_k[r, :, hi:] = np.nan
        dirty_v[r, :lo] = dirty_v[r, hi:] = np.nan
    dirty = np.asarray(f(q, jnp.asarray(dirty_k, dt), jnp.asarray(dirty_v, dt), mask))
    assert np.isfinite(dirty).all()
    np.testing.assert_array_equal(dirty, clean)
    tol = (2**-7 if bf16 else 2e-6) * np.abs(v).max()
    np.testing.assert_allclose(clean, _reference(q, k, v, mask, 0.125, bf16), rtol=0, atol=tol)


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("level", LEVELS)
def test_prompt_kernel_reads_only_the_live_positions(level, bf16):
    """A prompt's queries read only the positions their masks allow (widened to vectors of 16):
    NaN before the left padding's end and after the last token leaves the output finite and equal
    to the clean cache's, bit for bit."""
    shape = (1, 50, 2, 3, 32, 160, 128)
    q, k, v, _ = _case(shape, bf16, seed=11)
    slot, pad = np.array([46]), np.array([32])  # tokens at 46 .. 95: live [32, 96)
    mask = np.array(attention.causal_padding_mask(jnp.asarray(slot, jnp.int32), jnp.asarray(pad, jnp.int32), 50, 128))
    dt = jnp.bfloat16 if bf16 else jnp.float32
    fn = _kernel("prompt_attention")
    f = jax.jit(lambda q, k, v, m: fn(q, k, v, m, scale=0.125, level=level, threads=0))
    clean = np.asarray(f(q, jnp.asarray(k, dt), jnp.asarray(v, dt), mask))
    dirty_k, dirty_v = k.copy(), v.copy()
    dirty_k[:, :, :32] = dirty_k[:, :, 96:] = np.nan
    dirty_v[:, :32] = dirty_v[:, 96:] = np.nan
    dirty = np.asarray(f(q, jnp.asarray(dirty_k, dt), jnp.asarray(dirty_v, dt), mask))
    assert np.isfinite(dirty).all()
    np.testing.assert_array_equal(dirty, clean)
    tol = (2**-7 if bf16 else 2e-6) * np.abs(v).max()
    np.testing.assert_allclose(clean, _reference(q, k, v, mask, 0.125, bf16), rtol=0, atol=tol)


def _attend(q, k, v, mask, kvh, bias=None, every=1):
    return jax.jit(lambda q, k, v, m: attention.attend_cache(q, (k, v), m, 0.125, kvh, every, bias))(q, k, v, mask)


def _model_layout(shape, bf16, seed=1):
    """q [B, T, H, d] and the caches as nx stores them (bf16 as uint16 bits), from `_case`."""
    b, t, kvh, g, d, p, w = shape
    q, k, v, mask = _case(shape, bf16, seed)
    qm = q.reshape(kvh, b, g, t, d).transpose(1, 3, 0, 2, 4).reshape(b, t, kvh * g, d)
    dt = jnp.bfloat16 if bf16 else jnp.float32
    k, v = jnp.asarray(k, dt), jnp.asarray(v, dt)
    if bf16:
        k, v = jax.lax.bitcast_convert_type(k, jnp.uint16), jax.lax.bitcast_convert_type(v, jnp.uint16)
    return jnp.asarray(qm, dt), k, v, jnp.asarray(mask)


@pytest.mark.parametrize("bf16", [False, True], ids=["f32", "bf16"])
@pytest.mark.parametrize("shape", [s for s in SHAPES + PROMPT_SHAPES if s[4] % 16 == 0]
                         + [(1, 512, 1, 2, 32, 1024, 1024)], ids=str)  # (the last: XLA's blocked prompt path)
def test_attend_cache_equals_the_xla_path(monkeypatch, shape, bf16):
    """`attend_cache` through the kernel and with ``NX_CPU_KERNELS=off`` (XLA's window copy and
    dots); queries whose masks allow nothing are left out (XLA's blocked prompt path averages a
    block's keys for them, the kernels the window's, and neither reaches a real token)."""
    kvh = shape[2]
    q, k, v, mask = _model_layout(shape, bf16)
    lowered = jax.jit(lambda q, k, v, m: attention.attend_cache(q, (k, v), m, 0.125, kvh)).lower(q, k, v, mask)
    assert (TARGET if shape[1] == 1 else PROMPT_TARGET) in lowered.as_text()
    seen = np.asarray(mask).any(-1)  # [B, T]
    got = np.asarray(_attend(q, k, v, mask, kvh).astype(jnp.float32))[seen]
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    ref = np.asarray(_attend(q, k, v, mask, kvh).astype(jnp.float32))[seen]
    assert got.shape == ref.shape == (seen.sum(), q.shape[2] * q.shape[3])
    vmax = float(np.abs(np.asarray(jax.lax.bitcast_convert_type(v, jnp.bfloat16) if bf16 else v, np.float32)).max())
    # bf16 outputs: one rounding of each path's f32 result (2**-8), and the weights' roundings
    np.testing.assert_allclose(got, ref, rtol=0, atol=(2**-6 if bf16 else 4e-6) * vmax)


def _lowered(q, k, v, mask, kvh, **kw):
    f = jax.jit(lambda q, k, v, m: attention.attend_cache(q, (k, v), m, 0.125, kvh, **kw))
    return f.lower(q, k, v, mask).as_text()


def test_dispatch(monkeypatch):
    shape = (2, 1, 2, 2, 32, 40, 24)
    q, k, v, mask = _model_layout(shape, False)
    assert TARGET in _lowered(q, k, v, mask, 2)
    q2, k2, v2, mask2 = _model_layout((2, 2, 2, 2, 32, 40, 24), False)
    prompt = _lowered(q2, k2, v2, mask2, 2)  # prompts (two tokens a row): the prompt kernel
    assert PROMPT_TARGET in prompt and TARGET not in prompt
    bias = jnp.zeros((2, 4, 24), jnp.float32)
    assert TARGET not in _lowered(q, k, v, mask, 2, bias=bias)  # ALiBi: XLA
    assert TARGET not in _lowered(q, k, v, mask[:1], 2, every=2)  # context broadcasting: XLA
    f16 = jax.lax.bitcast_convert_type(k.astype(jnp.float16), jnp.uint16)
    assert TARGET not in _lowered(q.astype(jnp.float16), f16, f16.transpose(0, 2, 1), mask, 2)  # f16 caches: XLA
    assert TARGET not in _lowered(q.astype(jnp.bfloat16), k, v, mask, 2)  # mixed dtypes: XLA
    assert PROMPT_TARGET not in _lowered(q2, k2, v2, mask2[:1], 2, every=2)
    monkeypatch.setenv(cpu_kernels.ENV, "off")
    assert TARGET not in _lowered(q, k, v, mask, 2) and PROMPT_TARGET not in _lowered(q2, k2, v2, mask2, 2)
    monkeypatch.setenv(cpu_kernels.ENV, "avx2")  # not measured faster than XLA there
    assert TARGET not in _lowered(q, k, v, mask, 2) and PROMPT_TARGET not in _lowered(q2, k2, v2, mask2, 2)
    monkeypatch.setenv(cpu_kernels.ENV, "scalar")  # the scalar loops, for tests
    assert TARGET in _lowered(q, k, v, mask, 2) and PROMPT_TARGET in _lowered(q2, k2, v2, mask2, 2)


@pytest.mark.parametrize("platform", ["cuda", "tpu"])
@pytest.mark.parametrize("tokens", [1, 8])
def test_other_platforms_lower_the_xla_path(platform, tokens):
    q, k, v, mask = _model_layout((1, tokens, 2, 2, 32, 40, 24), False)
    f = jax.jit(lambda q, k, v, m: attention.attend_cache(q, (k, v), m, 0.125, 2))
    text = jax.export.export(f, platforms=[platform])(q, k, v, mask).mlir_module()
    assert TARGET not in text and PROMPT_TARGET not in text and "dot_general" in text
