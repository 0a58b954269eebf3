"""Attention over the on-device KV cache.

Cache layout per layer, kv-head major (row ``k * batch + b``): keys ``[kv_heads * batch, head_dim,
positions]`` (transposed) and values ``[kv_heads * batch, positions, head_dim]``. Each cache is then
exactly the operand its attention dot takes, in the plain ``[rows, inner] x [inner, cols]`` form
(queries x keys, probabilities x values, batched over rows), so XLA:CPU updates the caches in place
and reads them where they lie. Measured on SmolLM2 decode (256 positions, batch 1): the former
``[batch, positions, kv_heads, head_dim]`` layout made XLA copy every layer's K and V window into
a transposed layout at each step (2.8 of 27 ms), and untransposed keys made the scores dot read them
at a third of the speed (2.0 against 0.8 ms; 8.9 against 4.4 ms at batch 8). Under tensor
parallelism the leading axis splits into whole kv heads.

A program writes its new keys and values at `slot` (one `dynamic_update_slice` each, in place
because the caches are donated) and then attends over the first `window` positions, masking
padding and the future.

16-bit float caches (``amp`` bf16 / f16) are held as their uint16 bits (`cache_dtype`): XLA:CPU
computes a bf16 dynamic-update-slice in f32, converting the whole cache both ways at every step,
and written through a uint16 view of a bf16 array it still copied the whole cache behind the
bitcast (SmolLM2 bf16 decode at 256 positions: 27.3 ms per step with a 256-position cache, 46.5
with a 2048-position one). Held as uint16, the write is in place and readers view it as floats.
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

NEG_INF = -1e30  # finite, so fully masked rows of padding stay NaN-free
QUERY_BLOCK = 256  # longer prompts attend in blocks of this many query tokens (bounds the scores)


def cache_shapes(batch: int, positions: int, kv_heads: int, head_dim: int) -> tuple[tuple, tuple]:
    """The shapes of one layer's K and V caches."""
    return (kv_heads * batch, head_dim, positions), (kv_heads * batch, positions, head_dim)


def cache_dtype(dtype) -> jnp.dtype:
    """How a cache of `dtype` values is stored: 16-bit floats as their uint16 bits, else as is."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating) else dtype


def _stored(x: jnp.ndarray, cache: jnp.ndarray) -> jnp.ndarray:
    """Keys or values as the cache stores them (16-bit floats bit for bit as uint16)."""
    if cache.dtype == x.dtype:
        return x
    if cache.dtype != jnp.uint16:
        return x.astype(cache.dtype)
    if cache_dtype(x.dtype) != jnp.uint16:  # the bits of which 16-bit float? (not a value cast)
        raise TypeError(f"a uint16 cache holds 16-bit float bits; keys and values must be bf16 or f16, got {x.dtype}")
    return lax.bitcast_convert_type(x, jnp.uint16)


def _rows(x: jnp.ndarray) -> jnp.ndarray:
    """``[B, T, kvh, d]`` -> ``[kvh * B, T, d]`` (kv-head major, like the caches)."""
    b, t, kvh, d = x.shape
    return x.transpose(2, 0, 1, 3).reshape(kvh * b, t, d)


def update_caches(caches: tuple, k: jnp.ndarray, v: jnp.ndarray, slot: jnp.ndarray) -> tuple:
    """Write keys and values ``[B, T, kvh, d]`` into one layer's ``(K, V)`` caches at position `slot`
    (in place: one `dynamic_update_slice` each of the stored values, see `cache_dtype`)."""
    k_cache, v_cache = caches
    zero = jnp.zeros((), jnp.int32)
    keys = jnp.swapaxes(_rows(k), 1, 2)  # [rows, d, T]
    return (
        lax.dynamic_update_slice(k_cache, _stored(keys, k_cache), (zero, zero, slot)),
        lax.dynamic_update_slice(v_cache, _stored(_rows(v), v_cache), (zero, slot, zero)),
    )


def cache_windows(caches: tuple, window: int, kv_heads: int, every: int = 1, dtype=None) -> tuple:
    """The first `window` positions of one layer's ``(K, V)`` caches as `dtype` values (what a
    16-bit cache stores; see `cache_dtype`); with ``every > 1`` only every `every`-th batch row of
    each kv head (rows that context broadcasting filled identically)."""
    k, v = caches
    if window < v.shape[1] or k.dtype == jnp.uint16:
        # A gather, not a slice: XLA:CPU fuses a slice of the updated cache with the update itself,
        # duplicating the in-place write, and then copies both whole caches at every step. It does
        # the same with the float view of a whole uint16 cache, so that is gathered too (a copy of
        # the window, converted on the way, as every smaller window is).
        idx = jnp.arange(window, dtype=jnp.int32)
        k, v = jnp.take(k, idx, axis=2), jnp.take(v, idx, axis=1)
    if k.dtype == jnp.uint16:
        if dtype is None:
            raise ValueError("cache_windows: a uint16 (16-bit float) cache needs the dtype its values have")
        k, v = lax.bitcast_convert_type(k, dtype), lax.bitcast_convert_type(v, dtype)
    if every == 1:
        return k, v

    def thin(c):
        return c.reshape(kv_heads, c.shape[0] // kv_heads, *c.shape[1:])[:, ::every].reshape(-1, *c.shape[1:])

    return thin(k), thin(v)


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
    """Grouped-query attention of ``q [B, T, H, d]`` over cache windows (keys ``[kvh * B, d, W]``,
    values ``[kvh * B, W, d]``).

    Query head ``h`` reads kv head ``h // (H // kvh)``. `bias` (ALiBi) is ``[B, H, W]``. Returns
    ``[B, T, H * d]``. Softmax runs in f32.

    A prompt of more than `QUERY_BLOCK` tokens (a multiple of it) attends one block of queries at
    a time, so its f32 scores take ``H * QUERY_BLOCK * W`` floats per row at once, not ``H * T *
    W`` (8192 tokens of 32 heads would need 8.6 GB). Block ``i`` also leaves out the window's last
    ``(blocks - 1 - i) * QUERY_BLOCK`` keys: the window holds ``slot + T`` positions, so those are
    all in the block's future (masked anyway). SmolLM2 on 2 cores: 1024-token prefill 1.7 -> 1.2 s,
    4096 tokens ~12.6 s (blocks without the trim) -> 9.7 s.
    """
    t = q.shape[1]
    if t <= QUERY_BLOCK or t % QUERY_BLOCK:
        return _attend(q, k_cache, v_cache, mask, scale, bias)

    n, w = t // QUERY_BLOCK, k_cache.shape[-1]
    out = []
    for i in range(n):
        keys = w - (n - 1 - i) * QUERY_BLOCK  # later keys are in this block's future
        rows = slice(i * QUERY_BLOCK, (i + 1) * QUERY_BLOCK)
        out.append(_attend(q[:, rows], k_cache[:, :, :keys], v_cache[:, :keys], mask[:, rows, :keys], scale,
                           None if bias is None else bias[..., :keys]))
    return jnp.concatenate(out, axis=1)


def _attend(q, k_cache, v_cache, mask, scale, bias):
    b, t, h, d = q.shape
    rows, _, w = k_cache.shape
    kvh = rows // b
    g = h // kvh
    qr = q.reshape(b, t, kvh, g, d).transpose(2, 0, 3, 1, 4).reshape(rows, g * t, d)
    batched = ((0,), (0,))
    s = lax.dot_general(qr, k_cache, (((2,), (1,)), batched), preferred_element_type=jnp.float32)
    s = s.reshape(kvh, b, g, t, w) * scale
    if bias is not None:
        s = s + bias.reshape(b, kvh, g, w).transpose(1, 0, 2, 3)[:, :, :, None, :]
    s = jnp.where(mask[None, :, None], s, NEG_INF)
    # Softmax with its division after the values dot: a pass over [.., d] outputs, not [.., W] scores.
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    total = jnp.sum(e, axis=-1, keepdims=True)
    e = e.astype(v_cache.dtype).reshape(rows, g * t, w)
    o = lax.dot_general(e, v_cache, (((2,), (1,)), batched), preferred_element_type=jnp.float32)
    o = (o.reshape(kvh, b, g, t, d) / total).astype(v_cache.dtype)
    return o.transpose(1, 3, 0, 2, 4).reshape(b, t, h * d)
