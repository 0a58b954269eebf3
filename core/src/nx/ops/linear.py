"""Dense layers. Weights are stored ``[out, in]``, as torch's ``nn.Linear`` stores them: each
output is the dot product of the input with one contiguous weight row, which is also the faster
layout for the matrix-vector products of decoding on XLA:CPU (the lm head's ``[vocab, hidden]``
table is the same kind of matrix)."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from nx.ops import quant

SPLIT_BELOW = 1 << 19  # elements: XLA:CPU ran 768x576 matvecs on one thread, 960x576 on two
SMALL_ROWS = 16  # up to this many token rows, XLA:CPU's matmuls run faster as ``w @ x.T``


def project(x: jnp.ndarray, w, dtype) -> jnp.ndarray:
    """``x @ w.T`` in `dtype` for ``w [out, in]``, which may be an int8 `nx.ops.quant.QuantizedWeight`
    (multiplied in the program, see `nx.ops.quant`).

    Products of a few rows (batched decode) are computed as ``(w @ x.T).T``: XLA:CPU's YNNPACK
    matmuls read the weight faster that way (SmolLM2 decode step at batch 4: 53 -> 43 ms, batch 8:
    62 -> 54 ms, batch 16: 81 -> 77 ms) and transposing the few activation rows costs little. From
    32 rows (prefill) the transposes and slower matmuls outweigh it.

    One row is a matrix-vector product. XLA:CPU runs one on a single thread when the weight is
    small (SmolLM2's 576x576 attention output projection streamed at 13.5 GB/s against 22-27 for
    the larger weights), so a small weight is multiplied as a batch of its two row halves, which
    runs on two (decode step -1.1 ms, -4%).

    bf16/f16 products accumulate in f32 and are rounded to `dtype` after the dot, as a bf16 GEMM
    does: asked for a bf16 result, XLA:CPU instead converted both operands to f32 at every call
    (SmolLM2 bf16 decode 7 tokens/s); a single bf16 row also gets a zero second row, since XLA:CPU
    runs one-row bf16 products on a matrix-vector path at ~2 GB/s (bf16 decode 7 -> 35 tokens/s,
    batch 8 55 -> 223, 128-token prefill 245 -> 76 ms).
    """
    if quant.is_quantized(w):
        return quant.matmul(x, w).astype(dtype)
    return _products(x, w.astype(x.dtype)).astype(dtype)


def _products(x: jnp.ndarray, w: jnp.ndarray) -> jnp.ndarray:
    """``x @ w.T`` accumulated and returned in f32 (bf16/f16 inputs too: XLA:CPU upcasts both
    operands of a bf16-output dot to f32 at every call, whole weights included)."""
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


def row_parallel_linear(x: jnp.ndarray, p: dict, axis: str | None = None) -> jnp.ndarray:
    """A linear whose input dim is split over tensor-parallel `axis`: partial products are summed
    with one all-reduce before the (replicated) bias is added. Plain `linear` when `axis` is None.

    The partial products are summed in f32 and rounded to a 16-bit `amp` dtype once, as one
    device's f32-accumulated product is: rounding each device's part first made bf16 greedy
    tokens depend on the tp degree (tiny Llama, 30 tokens: 82% equal at tp 2 against tp 1). The
    all-reduce then moves f32 activations, twice the bytes of bf16 ones (one row per token)."""
    y = project(x, p["w"], jnp.float32)
    if axis is not None:
        y = lax.psum(y, axis)
    y = y.astype(x.dtype)
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
