"""CPU kernels for nx, called from XLA:CPU programs as typed FFI custom calls.

`s8_matmul(x, q, scale)` is nx's per-row int8 linear layer (``nx.ops.quant.matmul`` with
``int8_dot``): ``x`` f32 ``[m, k]`` split into two int8 terms per row (``hi``, ``lo``, ~15 bits),
int8 dots with ``q`` int8 ``[n, k]`` accumulated exactly in int32, ``scale`` f32 ``[n]`` applied
last; f32 ``[m, n]``. `s8_dot(a, q)` is the bare int8 x int8 -> int32 product (``a`` in
[-127, 127]), kept public so tests can check the accumulation exactly.

`grouped_matmul(x, q, scale, zero, bits=, group_size=)` is nx's grouped linear layer
(``nx.ops.quant._grouped_matmul``'s int8 path: GGUF Q4_0 / Q4_1 / Q4_K / Q8_0, nx's ``s4``): one
int8 activation term per block of 32 inputs (``nx.ops.quant.block_terms``; half the dot work of
two a row), exact int32 dots per block, weighted by the block scales, with the weight's
values (``q`` int8 ``[n, k]`` for bits 8; uint8 ``[n, k / 2]``, two 4-bit values a byte in
llama.cpp's order within a group, for bits 4: ``v = n - 8``, or ``n`` when ``zero`` is given),
weighted by the group scales (``scale`` f32 or f16 ``[n, k / group_size]``) and summed over the
groups in f32, plus ``zero [n, k / group_size]`` (f32 or f16) times each group's sum of ``x``.
``group_size`` must be a multiple of 32 that divides 512 (32 ... 512) or a multiple of 512.

`bf16_matmul(x, w, dtype=)` is nx's bf16 linear layer (``nx.ops.linear`` under ``amp="bf16"``):
``x [m, k] @ w.T`` for a bf16 ``w [n, k]`` and a bf16 or f32 ``x``, exact products summed in f32
(another order than XLA's: equal to f32 summation error), returned as f32 or rounded to bf16 (the
layer's output dtype: no separate rounding pass); ``glu="silu"`` returns ``silu(gate) * up`` of a
fused ``[gate; up]`` weight instead (a gated MLP's first layer, no pass over its output).

`f32_matmul(x, w)` is nx's f32 linear layer (``nx.ops.linear`` at the default precision): f32
``x [m, k] @ w.T`` for f32 ``w [n, k]``, fused multiply-adds summed in f32 (another order than
XLA's: equal to f32 summation error), the weight streamed once with software prefetch.

`decode_attention(q, k, v, mask, scale=)` is nx's attention of a few query tokens over its KV
cache (``nx.ops.attention._attend``): ``q`` ``[R, J, D]`` (cache row ``r = h * B + b``: the J
queries of batch row b that read kv head h), keys ``k [R, D, P]`` (transposed) and values
``v [R, P, D]`` (f32, or bf16 / their uint16 bits), ``mask`` bool ``[B, T, W]`` (query ``j`` is
token ``j % T``; only the first ``W <= P`` positions are read, in place); f32 ``[R, J, D]``, the
softmax-weighted values (weights rounded to bf16 for bf16 caches, as XLA's path does).
`prompt_attention` takes the same arguments and returns the same for a prompt's many query
tokens: tiles of queries, each over only the positions its tokens' masks allow.

`level` selects the instructions: ``"avx512_bf16"``, ``"avx512_vnni"``, ``"avx2"`` or ``"scalar"``
(each implies the ones after it; the s8 kernels run ``avx512_bf16`` as ``avx512_vnni``, the bf16
and f32 kernels run ``avx512_vnni`` and ``avx512_bf16`` as AVX-512F); None is the best this CPU has (`isa`). A level above the
CPU's is lowered to it by the library. `threads`: 0 uses every thread of XLA's intra-op pool, n > 0
at most n.

Importing this module loads the library and registers its targets with jax (platform ``cpu``).
Why: XLA:CPU has no fast int8, 4-bit or bf16 matrix-vector kernel, and its f32 one streams the
weights below the memory's speed (BENCHMARKS.md, "CPU kernels").
"""

from __future__ import annotations

import ctypes
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["LEVELS", "__version__", "bf16_matmul", "decode_attention", "f32_matmul", "grouped_matmul", "isa",
           "prompt_attention", "s8_dot", "s8_matmul"]

try:  # the installed distribution's version: one source of truth (pyproject.toml)
    __version__ = version("nx-kernels-cpu")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"

#: Dispatch levels, in the library's numbering.
LEVELS = {"scalar": 0, "avx2": 1, "avx512_vnni": 2, "avx512_bf16": 3}
_NAMES = {v: k for k, v in LEVELS.items()}

_MATMUL = "nx_kernels_cpu_s8_matmul"
_DOT = "nx_kernels_cpu_s8_dot"
_GROUPED = "nx_kernels_cpu_grouped_matmul"
_BF16 = "nx_kernels_cpu_bf16_matmul"
_F32 = "nx_kernels_cpu_f32_matmul"
_ATTENTION = "nx_kernels_cpu_decode_attention"
_PROMPT_ATTENTION = "nx_kernels_cpu_prompt_attention"

_lib = ctypes.CDLL(str(Path(__file__).with_name("libnx_kernels_cpu.so")))
_lib.nx_kernels_cpu_isa.restype = ctypes.c_int
_ISA = _NAMES[_lib.nx_kernels_cpu_isa()]

jax.ffi.register_ffi_target(_MATMUL, jax.ffi.pycapsule(_lib.NxS8Matmul), platform="cpu")
jax.ffi.register_ffi_target(_DOT, jax.ffi.pycapsule(_lib.NxS8Dot), platform="cpu")
jax.ffi.register_ffi_target(_GROUPED, jax.ffi.pycapsule(_lib.NxGroupedMatmul), platform="cpu")
jax.ffi.register_ffi_target(_BF16, jax.ffi.pycapsule(_lib.NxBf16Matmul), platform="cpu")
jax.ffi.register_ffi_target(_F32, jax.ffi.pycapsule(_lib.NxF32Matmul), platform="cpu")
jax.ffi.register_ffi_target(_ATTENTION, jax.ffi.pycapsule(_lib.NxDecodeAttention), platform="cpu")
jax.ffi.register_ffi_target(_PROMPT_ATTENTION, jax.ffi.pycapsule(_lib.NxPromptAttention), platform="cpu")


def isa() -> str:
    """The best level this CPU runs: ``"avx512_bf16"``, ``"avx512_vnni"``, ``"avx2"`` or ``"scalar"``."""
    return _ISA


def _level(level: str | None) -> np.int32:
    if level is None:
        return np.int32(LEVELS[_ISA])
    if level not in LEVELS:
        raise ValueError(f"level {level!r}: expected one of {sorted(LEVELS)}")
    return np.int32(min(LEVELS[level], LEVELS[_ISA]))


def s8_matmul(x, q, scale, *, level: str | None = None, threads: int = 0):
    """f32 ``[m, n]``: ``x [m, k]`` (cast to f32) times int8 ``q [n, k]`` transposed, times ``scale [n]``."""
    x = jnp.asarray(x, jnp.float32)
    m, n = x.shape[0], q.shape[0]
    call = jax.ffi.ffi_call(_MATMUL, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(x, q, jnp.asarray(scale, jnp.float32), level=_level(level), threads=np.int32(threads))


def s8_dot(a, q, *, level: str | None = None, threads: int = 0):
    """int32 ``a [r, k] @ q [n, k].T`` for int8 ``a`` (values in [-127, 127]) and int8 ``q``."""
    r, n = a.shape[0], q.shape[0]
    call = jax.ffi.ffi_call(_DOT, jax.ShapeDtypeStruct((r, n), jnp.int32), vmap_method="sequential")
    return call(a, q, level=_level(level), threads=np.int32(threads))


def grouped_matmul(x, q, scale, zero=None, *, bits: int, group_size: int, level: str | None = None, threads: int = 0,
                   panel: bool = False):
    """f32 ``[m, n]``: ``x [m, k]`` (cast to f32) times the grouped weight ``(q, scale, zero)`` transposed.

    With `panel`, the weight is in the panel layout (groups of 32): ``q`` ``[n / 16, k / 32, 64 * bits]``
    and ``scale`` / ``zero`` ``[n / 16, k / 32, 16]`` (see grouped_linear.cc)."""
    x = jnp.asarray(x, jnp.float32)
    m, n = x.shape[0], q.shape[0] * (16 if panel else 1)
    if bits not in (4, 8) or group_size % 32 or (512 % group_size and group_size % 512) or x.shape[1] % group_size:
        msg = f"bits {bits}, group_size {group_size}, k {x.shape[1]}: bits 4 or 8, group_size a multiple of 32"
        raise ValueError(f"{msg} that divides 512 or that 512 divides, and k a multiple of group_size expected")
    if panel and (group_size != 32 or q.shape[1:] != (x.shape[1] // 32, 64 * bits)):
        raise ValueError(f"the panel layout has groups of 32, q [n / 16, k / 32, 64 * bits]; got bits {bits}, "
                         f"group_size {group_size}, q {tuple(q.shape)} for k {x.shape[1]}")
    if zero is None:
        zero = jnp.zeros((0,), jnp.float32)
    call = jax.ffi.ffi_call(_GROUPED, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    attrs = dict(bits=np.int32(bits), group_size=np.int32(group_size), threads=np.int32(threads),
                 panel=np.int32(panel))
    return call(x, q, scale, zero, level=_level(level), **attrs)


def bf16_matmul(x, w, *, level: str | None = None, threads: int = 0, dtype=jnp.float32, glu: str | None = None):
    """``[m, n]`` in `dtype` (f32, or bf16: the f32 sums rounded to nearest even): ``x [m, k]`` (bf16 or
    f32; other dtypes cast to f32) times bf16 ``w [n, k]`` transposed.

    ``glu="silu"``: ``w`` holds two halves ``[gate; up]`` and the result is bf16 ``[m, n / 2]``,
    ``silu(gate) * up`` rounded as nx's XLA path rounds it (each half's sums to bf16, silu in f32 to
    bf16, the product to bf16), computed from the sums as they leave the registers."""
    if x.dtype not in (jnp.bfloat16, jnp.float32):
        x = jnp.asarray(x, jnp.float32)
    dtype = jnp.dtype(dtype)
    if dtype not in (jnp.float32, jnp.bfloat16):
        raise ValueError(f"dtype {dtype}: float32 or bfloat16 expected")
    m, n = x.shape[0], w.shape[0]
    if glu is not None:
        if glu != "silu" or dtype != jnp.bfloat16 or n % 2:
            raise ValueError(f"glu {glu!r} with dtype {dtype} and {n} weight rows: glu='silu' takes dtype=bfloat16 "
                             "and an even number of weight rows ([gate; up])")
        n //= 2
    call = jax.ffi.ffi_call(_BF16, jax.ShapeDtypeStruct((m, n), dtype), vmap_method="sequential")
    return call(x, jnp.asarray(w, jnp.bfloat16), level=_level(level), threads=np.int32(threads),
                glu=np.int32(glu is not None))


def f32_matmul(x, w, *, level: str | None = None, threads: int = 0):
    """f32 ``[m, n]``: ``x [m, k]`` times ``w [n, k]`` transposed (both cast to f32)."""
    x = jnp.asarray(x, jnp.float32)
    m, n = x.shape[0], w.shape[0]
    call = jax.ffi.ffi_call(_F32, jax.ShapeDtypeStruct((m, n), jnp.float32), vmap_method="sequential")
    return call(x, jnp.asarray(w, jnp.float32), level=_level(level), threads=np.int32(threads))


def decode_attention(q, k, v, mask, *, scale: float, level: str | None = None, threads: int = 0):
    """f32 ``[R, J, D]``: attention of ``q [R, J, D]`` over the caches ``k [R, D, P]``, ``v [R, P, D]``
    (both f32, or both bf16 or uint16 bf16 bits) where ``mask [B, T, W]`` allows (see the module docstring)."""
    return _attention(_ATTENTION, q, k, v, mask, scale, level, threads)


def prompt_attention(q, k, v, mask, *, scale: float, level: str | None = None, threads: int = 0):
    """`decode_attention` for a prompt's many query tokens a row (tiles of queries, causal ranges)."""
    return _attention(_PROMPT_ATTENTION, q, k, v, mask, scale, level, threads)


def _attention(target, q, k, v, mask, scale, level, threads):
    if k.dtype != v.dtype or k.dtype not in (jnp.float32, jnp.bfloat16, jnp.uint16):
        raise ValueError(f"caches f32, bf16 or uint16 (bf16 bits) of one dtype expected; got {k.dtype}, {v.dtype}")
    bf16 = k.dtype != jnp.float32
    if k.dtype == jnp.bfloat16:
        k, v = jax.lax.bitcast_convert_type(k, jnp.uint16), jax.lax.bitcast_convert_type(v, jnp.uint16)
    q = jnp.asarray(q, jnp.float32)
    call = jax.ffi.ffi_call(target, jax.ShapeDtypeStruct(q.shape, jnp.float32), vmap_method="sequential")
    return call(q, k, v, jnp.asarray(mask, jnp.bool_), scale=np.float32(scale), bf16=np.int32(bf16),
                level=_level(level), threads=np.int32(threads))
