"""Dense layers over weights stored ``[out, in]`` as torch stores them (contiguous output rows:
the faster layout for decode's matrix-vector products)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from nx.ops import cpu_kernels, quant
from nx.ops.activations import activation

SPLIT_BELOW = 1 << 19  # weights below this many elements: one-row products split in two (two threads)
SMALL_ROWS = 16  # up to this many token rows, products run as ``w @ x.T``


def project(x: jnp.ndarray, w, dtype) -> jnp.ndarray:
    """``x @ w.T`` in `dtype` for ``w [out, in]`` (or an int8 `nx.ops.quant.QuantizedWeight`),
    accumulated in f32 and rounded once. The formulation depends on the row count, because XLA:CPU's
    matmul paths differ that much (BENCHMARKS.md, "Design measurements behind nx.ops"). On the cpu
    platform where nx-kernels-cpu is installed:
    - bf16 weights with up to `cpu_kernels.BF16_MAX_ROWS` token rows run its bf16 kernel, which also
      rounds a bf16 result (XLA:CPU has no fast bf16 matrix-vector path, and its bf16 GEMM runs
      below the kernel's panels; BENCHMARKS.md, "bf16 CPU kernel", "bf16 prompt panels");
    - f32 weights and activations with 2 to `cpu_kernels.F32_MAX_ROWS` token rows run its f32 kernel
      (XLA's f32 dot runs below the machine's FMA and memory speed there; BENCHMARKS.md, "f32
      kernel: register tiles, and the bf16 kernel to 64 rows")."""
    if quant.is_quantized(w):
        return quant.matmul(x, w).astype(dtype)
    y = cpu_kernels.bf16_matmul(x, w, _xla, dtype)  # _xla: off the cpu platform
    if y is None:
        y = cpu_kernels.f32_matmul(x, w, _xla)
    return (_xla(x, w) if y is None else y).astype(dtype)


def _xla(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """XLA's dots: ``x @ w.T`` in f32, the weight cast to the activations' dtype."""
    return _products(x, w.astype(x.dtype))


def _products(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """``x @ w.T`` accumulated and returned in f32 (bf16/f16 inputs too)."""
    f32 = jnp.float32
    rows = x.size // x.shape[-1]
    if rows == 1 and x.dtype != f32:
        # one bf16/f16 row: a zero second row takes it off XLA:CPU's slow matrix-vector path
        x2 = jnp.concatenate([x.reshape(1, -1), jnp.zeros((1, x.shape[-1]), x.dtype)])
        y = lax.dot_general(x2, w, (((1,), (1,)), ((), ())), preferred_element_type=f32)
        return y[:1].reshape(*x.shape[:-1], w.shape[0])
    if 1 < rows <= SMALL_ROWS:
        y = lax.dot_general(w, x, (((1,), (x.ndim - 1,)), ((), ())), preferred_element_type=f32)
        return jnp.moveaxis(y, 0, -1)
    if rows == 1 and w.size < SPLIT_BELOW and w.shape[0] % 2 == 0:
        halves = w.reshape(2, w.shape[0] // 2, w.shape[1])
        xb = jnp.broadcast_to(x.reshape(1, 1, -1), (2, 1, x.shape[-1]))
        y = lax.dot_general(xb, halves, (((2,), (2,)), ((0,), (0,))), preferred_element_type=f32)
        return y.reshape(*x.shape[:-1], w.shape[0])
    return lax.dot_general(x, w, (((x.ndim - 1,), (1,)), ((), ())), preferred_element_type=f32)


def linear(x: jnp.ndarray, p: dict) -> jnp.ndarray:
    """``x @ w.T + b`` for ``p = {"w": [out, in], "b": [out] (optional)}``."""
    y = project(x, p["w"], x.dtype)
    if p.get("b") is not None:
        y = y + p["b"]
    return y


def gated_linear(x: jnp.ndarray, p: dict, act: str) -> jnp.ndarray:
    """``act(x @ Wg.T) * (x @ Wu.T)`` in x's dtype for ``p = {"w": [Wg; Wu]}`` (a gated MLP's gate and
    up fused as ``[2 * inter, in]``, plus an optional bias ``b``): each product rounded to x's dtype
    as `linear` rounds it, ``act`` computed in f32 and rounded (`nx.ops.activations.activation`), the
    product of the two rounded. Prompt chunks of bf16 weights run it inside nx-kernels-cpu's bf16
    kernel on the cpu platform (`cpu_kernels.bf16_glu`), everything else as written here."""

    def xla(x: jnp.ndarray, w: jnp.ndarray, bias: jnp.ndarray | None = None) -> jnp.ndarray:
        h = project(x, w, x.dtype)
        if bias is not None:
            h = h + bias
        gate, up = jnp.split(h, 2, axis=-1)
        return activation(act)(gate) * up

    if p.get("b") is None:
        y = cpu_kernels.bf16_glu(x, p["w"], act, xla)
        if y is not None:
            return y
    return xla(x, p["w"], p.get("b"))


def row_parallel_linear(x: jnp.ndarray, p: dict, axis: str | None = None) -> jnp.ndarray:
    """A linear whose input dim is split over tensor-parallel `axis`: partial products are summed
    with one all-reduce before the (replicated) bias is added. Plain `linear` when `axis` is None.
    Partial products are summed in f32 and rounded once, so the tp degree cannot change rounding."""
    if axis is None:
        y = project(x, p["w"], x.dtype)
    else:
        y = lax.psum(project(x, p["w"], jnp.float32), axis).astype(x.dtype)
    if p.get("b") is not None:
        y = y + p["b"]
    return y


def lm_head(x: jnp.ndarray, table: jnp.ndarray, bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """f32 logits from hidden states; `table` is ``[vocab, hidden]`` (tied embedding or lm head),
    possibly an int8 `QuantizedWeight` with per-vocab-row scales."""
    y = project(x, table, jnp.float32)
    if bias is not None:
        y = y + bias
    return y
