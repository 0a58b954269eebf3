"""Dense layers. Weights are stored ``[in, out]`` so activations multiply on the left."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from nx.ops import quant


def linear(x: jnp.ndarray, p: dict) -> jnp.ndarray:
    """``x @ w + b`` for ``p = {"w": [in, out], "b": [out] (optional)}``; ``w`` may be an int8
    `nx.ops.quant.QuantizedWeight` (dequantized in the program)."""
    w = p["w"]
    y = quant.matmul(x, w) if quant.is_quantized(w) else jnp.matmul(x, w.astype(x.dtype))
    if p.get("b") is not None:
        y = y + p["b"]
    return y


def row_parallel_linear(x: jnp.ndarray, p: dict, axis: str | None = None) -> jnp.ndarray:
    """A linear whose input dim is split over tensor-parallel `axis`: partial products are summed
    with one all-reduce before the (replicated) bias is added. Plain `linear` when `axis` is None."""
    y = linear(x, {"w": p["w"]})
    if axis is not None:
        y = lax.psum(y, axis)
    if p.get("b") is not None:
        y = y + p["b"]
    return y


def lm_head(x: jnp.ndarray, table: jnp.ndarray, bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """f32 logits from hidden states; `table` is ``[vocab, hidden]`` (tied embedding or lm head),
    possibly an int8 `QuantizedWeight` with per-vocab-row scales."""
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    if quant.is_quantized(table):
        y = quant.table_logits(x, table)
    else:
        y = lax.dot_general(x, table.astype(x.dtype), dims, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias
    return y
