"""Token embedding lookup and vocabulary logits, optionally split over a tensor-parallel axis."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from nx.ops import quant
from nx.ops.linear import lm_head


def _rows(table, ids: jnp.ndarray) -> jnp.ndarray:
    if quant.is_quantized(table):
        return quant.take_rows(table, ids, quant.DTYPES[table.dtype])
    return jnp.take(table, ids, axis=0)


def embed(ids: jnp.ndarray, table: jnp.ndarray, axis: str | None = None) -> jnp.ndarray:
    """Rows of `table` for `ids`. With `axis`, each shard holds a vocabulary slice: it looks up the
    ids it owns, zeros the rest, and one all-reduce assembles the embeddings. `table` may be an
    int8 `QuantizedWeight` with per-row scales."""
    if axis is None:
        return _rows(table, ids)
    n = table.shape[0]
    local = ids - lax.axis_index(axis) * n
    owned = (local >= 0) & (local < n)
    x = _rows(table, jnp.clip(local, 0, n - 1))
    return lax.psum(jnp.where(owned[..., None], x, 0).astype(x.dtype), axis)


def logits(x: jnp.ndarray, table: jnp.ndarray, bias: jnp.ndarray | None, vocab: int, axis: str | None = None):
    """f32 logits ``[..., vocab]``; with `axis`, each shard computes its vocabulary slice and an
    all-gather joins them (padding rows added for divisibility are dropped)."""
    y = lm_head(x, table, bias)
    if axis is not None:
        y = lax.all_gather(y, axis, axis=y.ndim - 1, tiled=True)
    return y[..., :vocab] if y.shape[-1] != vocab else y
