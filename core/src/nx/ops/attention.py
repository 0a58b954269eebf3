"""Attention over the on-device KV cache.

Cache layout per layer: ``[batch, positions, kv_heads, head_dim]``. A program writes its new keys
and values at `slot` (one `dynamic_update_slice`, in place because the cache is donated) and then
attends over the first `window` positions, masking padding and the future.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NEG_INF = -1e30  # finite, so fully masked rows of padding stay NaN-free


def update_cache(cache: jnp.ndarray, new: jnp.ndarray, slot: jnp.ndarray) -> jnp.ndarray:
    """Write ``new [B, T, kvh, d]`` into ``cache [B, N, kvh, d]`` at position `slot`."""
    zero = jnp.zeros((), jnp.int32)
    return lax.dynamic_update_slice(cache, new.astype(cache.dtype), (zero, slot, zero, zero))


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
    """Grouped-query attention of ``q [B, T, H, d]`` over cache windows ``[B, W, kvh, d]``.

    `bias` (ALiBi) is ``[B, H, W]``. Returns ``[B, T, H * d]``. Softmax runs in f32.
    """
    b, t, h, d = q.shape
    kvh = k_cache.shape[2]
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d)
    s = jnp.einsum("btkgd,bwkd->bkgtw", qg, k_cache, preferred_element_type=jnp.float32) * scale
    if bias is not None:
        s = s + bias.reshape(b, kvh, g, 1, -1)
    s = jnp.where(mask[:, None, None, :, :], s, NEG_INF)
    p = jax.nn.softmax(s, axis=-1).astype(v_cache.dtype)
    o = jnp.einsum("bkgtw,bwkd->btkgd", p, v_cache)
    return o.reshape(b, t, h * d)
