"""The generic decoder: composes `nx.ops` according to a `ModelSpec`.

`step` is the body of every compiled program. It embeds `T` tokens written at cache `slot`,
runs every layer (by default a Python loop, so the program is fully unrolled and each layer's weights
and cache are separate arguments: slicing stacked arrays measured 3-10x slower on CPU; ``unroll=k``
scans blocks of k layers instead, see `nx.scan`), and returns
the logits of token `last` of each row plus the updated caches.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from nx import names as N
from nx import ops, scan
from nx.spec import ModelSpec

LayerCache = tuple[jnp.ndarray, jnp.ndarray]


class StepInputs(NamedTuple):
    """Traced inputs of one program call (every varying quantity, so one program serves a bucket)."""

    tokens: jnp.ndarray  # [B, T] int32
    slot: jnp.ndarray  # [B] int32: cache position of each row's tokens[b, 0] (rows may differ)
    pad: jnp.ndarray  # [B] int32: leading padding slots of each row (masked)
    last: jnp.ndarray  # [] int32: index in T whose logits are returned
    row: jnp.ndarray  # [] int32: the batch row an insert program writes (unused by the others)


def _attention(spec: ModelSpec, p: dict, h: jnp.ndarray, cache: LayerCache, ctx: _Context, only: jnp.ndarray | None = None):
    b, t, _ = h.shape
    qkv = ops.linear(h, p[N.QKV])
    nq, nkv = spec.n_heads * spec.head_dim, spec.kv_heads * spec.head_dim
    q = qkv[..., :nq].reshape(b, t, spec.n_heads, spec.head_dim)
    k = qkv[..., nq : nq + nkv].reshape(b, t, spec.kv_heads, spec.head_dim)
    v = qkv[..., nq + nkv :].reshape(b, t, spec.kv_heads, spec.head_dim)
    if spec.positions == "rope":
        q = ops.apply_rotary(q, ctx.rotary, spec.rope)
        k = ops.apply_rotary(k, ctx.rotary, spec.rope)
    cache = ops.update_caches(cache, k, v, ctx.slot, ctx.first, ctx.rep, ctx.kv_dtype)
    q, mask = _select(q, only), _select(ctx.mask, only)
    read = cache if ctx.first is None else ops.cache_row(cache, ctx.first[0], spec.kv_heads)
    o = ops.attend_cache(q, read, mask, spec.scale, spec.kv_heads, ctx.rep, ctx.bias, ctx.kv_dtype)
    return ops.row_parallel_linear(o, p[N.O], ctx.tp_axis), cache


def _select(y: jnp.ndarray, only: jnp.ndarray | None) -> jnp.ndarray:
    """Token `only` of ``y [B, T, ...]`` as ``[B, 1, ...]``; all of `y` when `only` is None."""
    return y if only is None else lax.dynamic_slice_in_dim(y, only, 1, axis=1)


class _Parts(NamedTuple):
    """What a block function composes: norms by name, attention (writing the cache), the MLP."""

    norm: Callable[[str, jnp.ndarray], jnp.ndarray]
    attention: Callable[[jnp.ndarray], tuple[jnp.ndarray, LayerCache]]  # normed input -> (out, cache)
    mlp: Callable[[jnp.ndarray], jnp.ndarray]
    select: Callable[[jnp.ndarray], jnp.ndarray]  # the token(s) the block returns


def _sequential(f: _Parts, x, from_norm: bool = False):
    h = f.norm(N.ATTN_NORM, x)
    a, cache = f.attention(h)
    x = f.select(h if from_norm else x) + a
    h = f.norm(N.MLP_NORM, x)
    return (h if from_norm else x) + f.mlp(h), cache


def _parallel(f: _Parts, x, shared_norm: bool = False):
    h = f.norm(N.ATTN_NORM, x)
    a, cache = f.attention(h)
    x, h = f.select(x), f.select(h)
    return x + a + f.mlp(h if shared_norm else f.norm(N.MLP_NORM, x)), cache


def _post_norm(f: _Parts, x):
    a, cache = f.attention(x)
    x = f.norm(N.ATTN_NORM, f.select(x) + a)
    return f.norm(N.MLP_NORM, x + f.mlp(x)), cache


#: Residual wiring of each `nx.spec.Block` kind (adding a kind: a function here and its name there).
BLOCKS: dict[str, Callable[[_Parts, jnp.ndarray], tuple[jnp.ndarray, LayerCache]]] = {
    "sequential": _sequential,
    "sequential_from_norm": functools.partial(_sequential, from_norm=True),
    "parallel": _parallel,
    "parallel_shared_norm": functools.partial(_parallel, shared_norm=True),
    "post_norm": _post_norm,
}


def layer(spec: ModelSpec, p: dict, x: jnp.ndarray, cache: LayerCache, ctx: _Context, only: jnp.ndarray | None = None):
    """One transformer block, wired as ``spec.block`` says (`BLOCKS`).

    With `only` (a ``[]`` index into the tokens) every token's keys and values still reach the
    cache, but the queries, the attention output and the MLP run for that one token, whose output
    ``[B, 1, hidden]`` is all the block returns (the last layer of a prompt).
    """
    parts = _Parts(
        norm=lambda name, y: ops.norm(spec.norm, y, p[name], spec.norm_eps),
        attention=lambda h: _attention(spec, p, h, cache, ctx, only),
        mlp=lambda y: ops.mlp(y, p, spec.activation, spec.gated_mlp, ctx.tp_axis),
        select=lambda y: _select(y, only),
    )
    return BLOCKS[spec.block](parts, x)


class _Context(NamedTuple):
    slot: jnp.ndarray
    rotary: tuple[jnp.ndarray, jnp.ndarray] | None  # (cos, sin) of the tokens' rotary angles
    mask: jnp.ndarray  # [B, T, W]
    bias: jnp.ndarray | None  # [B, H, W] ALiBi
    window: int
    tp_axis: str | None  # mesh axis name when running one tensor-parallel shard
    rep: int  # cache rows per token row: > 1 when one prompt row fills several (context broadcasting)
    first: jnp.ndarray | None  # [1]: the batch row an insert writes and reads (None: token row i is row i*rep)
    kv_dtype: jnp.dtype | None  # the caches' values (None: the compute dtype's)


def step(
    spec: ModelSpec,
    params: dict,
    caches: list[LayerCache],
    inp: StepInputs,
    window: int,
    tp_axis: str | None = None,
    vocab_size: int | None = None,
    unroll: int | None = None,
    insert: bool = False,
    kv_dtype=None,
):
    """Run the decoder on ``inp.tokens``; return (logits ``[B, vocab]`` f32, updated caches).

    With fewer token rows than cache rows (context broadcasting), prompt row ``i`` fills cache
    rows ``i*rep .. i*rep+rep-1`` and the logits are repeated the same way. With `insert`, the one
    token row is a prompt written into batch row ``inp.row`` and attending over that row only,
    while every other row keeps its state (continuous batching).

    Under tensor parallelism (inside ``shard_map`` over `tp_axis`) `spec` is the shard's local spec
    (its share of heads and MLP width) and `vocab_size` the model's full vocabulary.

    With `unroll` (a block size, see `nx.scan`) the layers run as a ``lax.scan`` over stacked blocks.
    `kv_dtype`: the dtype of the caches' values (`nx.config` ``kv_dtype``; None: the compute dtype).
    """
    b, t = inp.tokens.shape
    slot = inp.slot
    positions = jnp.maximum(slot[:, None] + jnp.arange(t, dtype=jnp.int32)[None, :] - inp.pad[:, None], 0)
    x = ops.embed(inp.tokens, params[N.EMBED][N.W], tp_axis)
    if spec.project_dim:  # before the positions: a learned position table has the hidden width
        x = ops.linear(x, params[N.PROJECT_IN])
    if spec.positions == "learned":
        x = x + ops.embed(positions + spec.position_offset, params[N.POS][N.W])  # the table may be int8
    if spec.embed_norm:
        x = ops.norm(spec.norm, x, params[N.EMBED_NORM], spec.norm_eps)
    bias = None
    if spec.positions == "alibi":
        key_pos = (jnp.arange(window, dtype=jnp.int32)[None, :] - inp.pad[:, None]).astype(jnp.float32)
        bias = _local_alibi_slopes(spec, tp_axis)[None, :, None] * key_pos[:, None, :]
    # caches are [[blocks,] kv_heads * batch, ., .]
    rep = 1 if insert else caches[0][0].shape[-3] // (spec.kv_heads * b)
    rotary = ops.rotary_tables(positions, spec.rope, window) if spec.positions == "rope" else None
    mask = ops.causal_padding_mask(slot, inp.pad, t, window)
    ctx = _Context(slot, rotary, mask, bias, window, tp_axis, rep, inp.row[None] if insert else None, kv_dtype)
    if unroll is None:
        # the last layer computes only the token whose logits are returned (see `layer`)
        only = [None] * (len(caches) - 1) + [inp.last if t > 1 else None]
        new_caches = []
        for p, cache, one in zip(params["layers"], caches, only):
            x, cache = layer(spec, p, x, cache, ctx, one)
            new_caches.append(cache)
    else:  # stacked weights and caches of blocks of `unroll` layers (see nx.scan)
        x, new_caches = scan.run_layers(lambda p, y, c: layer(spec, p, y, c, ctx), params["layers"], caches, x)
    # [B, hidden]: one token per row reaches the lm head (the unrolled last layer kept only that one)
    x = x[:, 0] if unroll is None else jnp.take(x, inp.last, axis=1)
    if spec.final_norm:
        x = ops.norm(spec.norm, x, params[N.FINAL_NORM], spec.norm_eps)
    if spec.project_dim:
        x = ops.linear(x, params[N.PROJECT_OUT])
    head = params.get(N.LM_HEAD, {})
    table = params[N.EMBED][N.W] if spec.tied_lm_head else head[N.W]
    logits = ops.logits(x, table, head.get(N.B), vocab_size or spec.vocab_size, tp_axis)
    return (jnp.repeat(logits, rep, axis=0) if rep > 1 else logits), new_caches


def _local_alibi_slopes(spec: ModelSpec, tp_axis: str | None) -> jnp.ndarray:
    """ALiBi slopes of this shard's heads (all heads without tensor parallelism)."""
    if tp_axis is None:
        return jnp.asarray(ops.alibi_slopes(spec.n_heads))
    tp = lax.psum(1, tp_axis)
    slopes = jnp.asarray(ops.alibi_slopes(spec.n_heads * tp))
    return lax.dynamic_slice_in_dim(slopes, lax.axis_index(tp_axis) * spec.n_heads, spec.n_heads)
