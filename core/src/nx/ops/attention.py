"""Attention over the on-device KV cache.

Cache layout per layer: ``[kv_heads * batch, positions, head_dim]``, kv-head major (row
``k * batch + b``). Each row's window is contiguous and the cache is exactly the operand both
attention dots take (batched over rows), so XLA updates it in place and reads it where it lies.
With the former ``[batch, positions, kv_heads, head_dim]`` layout XLA:CPU copied every layer's K
and V window into a transposed layout at each step (2.8 of 27 ms per SmolLM2 decode step at 256
positions). Under tensor parallelism the leading axis splits into whole kv heads.

A program writes its new keys and values at `slot` (one `dynamic_update_slice`, in place because
the cache is donated) and then attends over the first `window` positions, masking padding and the
future.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1e30  # finite, so fully masked rows of padding stay NaN-free


def cache_shape(batch: int, positions: int, kv_heads: int, head_dim: int) -> tuple[int, int, int]:
    """The shape of one layer's K (or V) cache."""
    return kv_heads * batch, positions, head_dim


def _rows(x: jnp.ndarray) -> jnp.ndarray:
    """``[B, T, kvh, d]`` -> ``[kvh * B, T, d]`` (kv-head major, like the cache)."""
    b, t, kvh, d = x.shape
    return x.transpose(2, 0, 1, 3).reshape(kvh * b, t, d)


def update_cache(cache: jnp.ndarray, new: jnp.ndarray, slot: jnp.ndarray) -> jnp.ndarray:
    """Write ``new [B, T, kvh, d]`` into ``cache [kvh * B, N, d]`` at position `slot`."""
    zero = jnp.zeros((), jnp.int32)
    return lax.dynamic_update_slice(cache, _rows(new).astype(cache.dtype), (zero, slot, zero))


def cache_window(cache: jnp.ndarray, window: int, kv_heads: int, every: int = 1) -> jnp.ndarray:
    """The first `window` positions of ``cache [kvh * B, N, d]``; with ``every > 1`` only every
    `every`-th batch row of each kv head (rows that context broadcasting filled identically)."""
    c = cache[:, :window]
    if every == 1:
        return c
    rows, w, d = c.shape
    return c.reshape(kv_heads, rows // kv_heads, w, d)[:, ::every].reshape(-1, w, d)


def causal_padding_mask(slot: jnp.ndarray, pad: jnp.ndarray, n_tokens: int, window: int) -> jnp.ndarray:
    """``[B, T, W]`` bool: query at slot ``slot+t`` may see key slot ``j`` iff ``pad[b] <= j <= slot+t``."""
    q = slot + jnp.arange(n_tokens, dtype=jnp.int32)
    j = jnp.arange(window, dtype=jnp.int32)
    return (j[None, None, :] <= q[None, :, None]) & (j[None, None, :] >= pad[:, None, None])


def attend(
    q: jnp.ndarray,
    k_cache: jnp.ndarray,
    v_cache: jnp.ndarray,
    mask: jnp.ndarray,
    scale: float,
    bias: jnp.ndarray | None = None,
) -> jnp.ndarray:
    """Grouped-query attention of ``q [B, T, H, d]`` over cache windows ``[kvh * B, W, d]``.

    Query head ``h`` reads kv head ``h // (H // kvh)``. `bias` (ALiBi) is ``[B, H, W]``. Returns
    ``[B, T, H * d]``. Softmax runs in f32.
    """
    b, t, h, d = q.shape
    rows, w, _ = k_cache.shape
    kvh = rows // b
    g = h // kvh
    qr = q.reshape(b, t, kvh, g, d).transpose(2, 0, 3, 1, 4).reshape(rows, g * t, d)
    batched = ((0,), (0,))
    s = lax.dot_general(qr, k_cache, (((2,), (2,)), batched), preferred_element_type=jnp.float32)
    s = s.reshape(kvh, b, g, t, w) * scale
    if bias is not None:
        s = s + bias.reshape(b, kvh, g, w).transpose(1, 0, 2, 3)[:, :, :, None, :]
    s = jnp.where(mask[None, :, None], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(v_cache.dtype).reshape(rows, g * t, w)
    o = lax.dot_general(p, v_cache, (((2,), (1,)), batched))  # [kvh * B, g * T, d]
    return o.reshape(kvh, b, g, t, d).transpose(1, 3, 0, 2, 4).reshape(b, t, h * d)
