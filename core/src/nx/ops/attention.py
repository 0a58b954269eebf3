"""Attention over the on-device KV cache.

Cache layout per layer, kv-head major (row ``k * batch + b``): keys ``[kv_heads * batch, head_dim,
positions]`` (transposed) and values ``[kv_heads * batch, positions, head_dim]``, each exactly the
operand its attention dot takes, so XLA updates the caches in place and reads them where they lie.
16-bit float caches are held as their uint16 bits (`cache_dtype`) so the write stays in place.
Under tensor parallelism the leading axis splits into whole kv heads. The measurements behind
these choices are in BENCHMARKS.md ("Design measurements behind nx.ops").
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from nx.ops import cpu_kernels

NEG_INF = -1e30  # finite, so fully masked rows of padding stay NaN-free
QUERY_BLOCK = 256  # longer prompts attend in blocks of this many query tokens (bounds the scores)


def cache_shapes(batch: int, positions: int, kv_heads: int, head_dim: int) -> tuple[tuple, tuple]:
    """The shapes of one layer's K and V caches."""
    return (kv_heads * batch, head_dim, positions), (kv_heads * batch, positions, head_dim)


def cache_dtype(dtype) -> jnp.dtype:
    """How a cache of `dtype` values is stored: 16-bit floats as their uint16 bits, else as is."""
    dtype = jnp.dtype(dtype)
    return jnp.dtype(jnp.uint16) if dtype.itemsize == 2 and jnp.issubdtype(dtype, jnp.floating) else dtype


def _stored(x: jnp.ndarray, cache: jnp.ndarray, dtype=None) -> jnp.ndarray:
    """Keys or values as a cache of `dtype` values (default: x's) stores them: rounded to `dtype`,
    16-bit floats bit for bit as uint16."""
    dtype = jnp.dtype(x.dtype if dtype is None else dtype)
    if cache.dtype == x.dtype:
        return x
    if cache.dtype != jnp.uint16:
        return x.astype(cache.dtype)
    if cache_dtype(dtype) != jnp.uint16:  # the bits of which 16-bit float? (not a value cast)
        raise TypeError(f"a uint16 cache holds 16-bit float bits; its dtype must be bf16 or f16, got {dtype}")
    return lax.bitcast_convert_type(x.astype(dtype), jnp.uint16)


def update_caches(caches: tuple, k: jnp.ndarray, v: jnp.ndarray, slot: jnp.ndarray, first=None, rep: int = 1,
                  dtype=None) -> tuple:
    """Write keys and values ``[b, T, kvh, d]`` into one layer's ``(K, V)`` caches: token row ``i``
    at positions ``slot[i] ..`` of batch rows ``first[i] .. first[i] + rep - 1`` (default
    ``first[i] = i * rep``; `rep` > 1 when one prompt row fills several batch rows), rounded to the
    caches' `dtype` (default: the keys').

    Every write is in place (see `cache_dtype`): decode steps scatter each row's token at its own
    position (continuous batching), an insert writes its row, and a prompt of several rows (which
    share ``slot[0]``, as a `Session` feeds them) is one write per cache."""
    kc, vc = caches
    b, t, kvh, d = k.shape
    batch = kc.shape[0] // kvh
    if t == 1 and first is None and rep == 1 and b == batch and b > 1:
        # one token per row (decode): one scatter per cache, row k*batch+i at slot[i]
        rows, at = jnp.arange(kvh * b, dtype=jnp.int32), jnp.tile(slot, kvh)
        keys, values = (x[:, 0].transpose(1, 0, 2).reshape(kvh * b, d) for x in (k, v))
        return kc.at[rows, :, at].set(_stored(keys, kc, dtype)), vc.at[rows, at, :].set(_stored(values, vc, dtype))
    zero = jnp.zeros((), jnp.int32)
    if first is None and t > 1:
        # a prompt (prefill): its rows share one slot, so one in-place write of every row per cache
        keys = jnp.repeat(k, rep, axis=0).transpose(2, 0, 3, 1).reshape(kvh * b * rep, d, t)
        values = jnp.repeat(v, rep, axis=0).transpose(2, 0, 1, 3).reshape(kvh * b * rep, t, d)
        return (lax.dynamic_update_slice(kc, _stored(keys, kc, dtype), (zero, zero, slot[0])),
                lax.dynamic_update_slice(vc, _stored(values, vc, dtype), (zero, slot[0], zero)))
    for i in range(b):
        row = jnp.int32(i * rep) if first is None else first[i]
        ki = _stored(jnp.repeat(k[i].transpose(1, 2, 0)[:, None], rep, axis=1), kc, dtype)  # [kvh, rep, d, T]
        vi = _stored(jnp.repeat(v[i].transpose(1, 0, 2)[:, None], rep, axis=1), vc, dtype)  # [kvh, rep, T, d]
        for h in range(kvh):  # batch rows of one kv head are contiguous: one in-place write each
            at = h * batch + row
            kc = lax.dynamic_update_slice(kc, ki[h], (at, zero, slot[i]))
            vc = lax.dynamic_update_slice(vc, vi[h], (at, slot[i], zero))
    return kc, vc


def cache_row(caches: tuple, row: jnp.ndarray, kv_heads: int) -> tuple:
    """Batch row `row` of one layer's ``(K, V)`` caches, laid out as a one-row cache."""
    out = []
    for c in caches:
        grouped = c.reshape(kv_heads, -1, *c.shape[1:])
        out.append(lax.dynamic_slice_in_dim(grouped, row, 1, axis=1).reshape(kv_heads, *c.shape[1:]))
    return tuple(out)


def cache_windows(caches: tuple, window: int, kv_heads: int, every: int = 1, dtype=None) -> tuple:
    """The first `window` positions of one layer's ``(K, V)`` caches as `dtype` values (what a
    16-bit cache stores; see `cache_dtype`); with ``every > 1`` only every `every`-th batch row of
    each kv head (rows that context broadcasting filled identically)."""
    k, v = caches
    if window < v.shape[1] or k.dtype == jnp.uint16:
        # a gather, not a slice: XLA:CPU fuses a slice with the in-place update and copies both caches
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


def attend_cache(
    q: jnp.ndarray,
    caches: tuple,
    mask: jnp.ndarray,
    scale: float,
    kv_heads: int,
    every: int = 1,
    bias: jnp.ndarray | None = None,
    dtype=None,
) -> jnp.ndarray:
    """`attend` over the first ``mask.shape[-1]`` positions of one layer's ``(K, V)`` caches
    (`cache_windows`, with `every`) of `dtype` values (default: q's). Caches of another dtype than
    q's: the scores in the wider of the two, the softmax's weights rounded to the caches' dtype as
    for a model computing in it, the output in q's dtype.

    On the cpu platform nx-kernels-cpu's attention kernels run where they apply
    (`cpu_kernels.cache_attention`): they read the window in place, where XLA's two dots copy it
    out and run as general matrix products, and a prompt's queries read only the keys their masks
    allow, where XLA's path scores, masks and exponentiates the whole window."""
    window = mask.shape[-1]
    dtype = jnp.dtype(q.dtype if dtype is None else dtype)

    def xla(q, caches, mask):
        return attend(q, *cache_windows(caches, window, kv_heads, every, dtype), mask, scale, bias)

    out = None
    if bias is None and every == 1:
        out = cpu_kernels.cache_attention(q, caches, mask, scale, xla, dtype)
    return xla(q, caches, mask) if out is None else out


def causal_padding_mask(slot: jnp.ndarray, pad: jnp.ndarray, n_tokens: int, window: int) -> jnp.ndarray:
    """``[B, T, W]`` bool: row b's query at ``slot[b]+t`` may see key slot ``j`` iff ``pad[b] <= j <= slot[b]+t``."""
    q = slot[:, None] + jnp.arange(n_tokens, dtype=jnp.int32)[None, :]
    j = jnp.arange(window, dtype=jnp.int32)
    return (j[None, None, :] <= q[:, :, None]) & (j[None, None, :] >= pad[:, None, None])


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
    ``[B, T, H * d]`` in q's dtype. Softmax runs in f32; scores take the wider of q's and the keys'
    dtypes, and the weights are rounded to the values' dtype before their dot.

    A prompt of more than `QUERY_BLOCK` tokens (a multiple of it) attends one block of queries at
    a time, bounding its f32 scores to ``H * QUERY_BLOCK * W`` per row; block ``i`` leaves out the
    window's last ``(blocks - 1 - i) * QUERY_BLOCK`` keys, all in its future.
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
    wide = jnp.promote_types(q.dtype, k_cache.dtype)
    batched = ((0,), (0,))
    s = lax.dot_general(qr.astype(wide), k_cache.astype(wide), (((2,), (1,)), batched),
                        preferred_element_type=jnp.float32)
    s = s.reshape(kvh, b, g, t, w) * scale
    if bias is not None:
        s = s + bias.reshape(b, kvh, g, w).transpose(1, 0, 2, 3)[:, :, :, None, :]
    s = jnp.where(mask[None, :, None], s, NEG_INF)
    # Softmax with its division after the values dot: a pass over [.., d] outputs, not [.., W] scores.
    e = jnp.exp(s - jnp.max(s, axis=-1, keepdims=True))
    total = jnp.sum(e, axis=-1, keepdims=True)
    e = e.astype(v_cache.dtype).reshape(rows, g * t, w)
    o = lax.dot_general(e, v_cache, (((2,), (1,)), batched), preferred_element_type=jnp.float32)
    o = (o.reshape(kvh, b, g, t, d) / total).astype(q.dtype)
    return o.transpose(1, 3, 0, 2, 4).reshape(b, t, h * d)
