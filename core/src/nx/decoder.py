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


# A serving program's inputs: rows 0..B-1 are the decode tokens (column 0; slot and pad per row
# as a decode step takes them); with a prompt chunk, one more row B holds it, written into batch
# row `row` from `slot[B]`, and `last` indexes the chunk's token whose logits are returned.


def _attention(spec: ModelSpec, p: dict, h: jnp.ndarray, cache: LayerCache, ctx: _Context, only: jnp.ndarray | None = None):
    q, k, v = _qkv(spec, p, h, ctx)
    cache = ops.update_caches(cache, k, v, ctx.slot, ctx.first, ctx.rep)
    return _attend(spec, p, q, cache, ctx, only), cache


def _qkv(spec: ModelSpec, p: dict, h: jnp.ndarray, ctx: _Context | None):
    """Queries, keys and values ``[B, T, heads, head_dim]`` of the normed input (rotary applied)."""
    b, t, _ = h.shape
    qkv = ops.linear(h, p[N.QKV])
    nq, nkv = spec.n_heads * spec.head_dim, spec.kv_heads * spec.head_dim
    q = qkv[..., :nq].reshape(b, t, spec.n_heads, spec.head_dim)
    k = qkv[..., nq : nq + nkv].reshape(b, t, spec.kv_heads, spec.head_dim)
    v = qkv[..., nq + nkv :].reshape(b, t, spec.kv_heads, spec.head_dim)
    if spec.positions == "rope" and ctx is not None:  # None: the caller applies each part's own angles
        q = ops.apply_rotary(q, ctx.rotary, spec.rope)
        k = ops.apply_rotary(k, ctx.rotary, spec.rope)
    return q, k, v


def _attend(spec: ModelSpec, p: dict, q: jnp.ndarray, cache: LayerCache, ctx: _Context, only: jnp.ndarray | None):
    """The attention output projection of queries `q` over the (already written) caches."""
    return ops.row_parallel_linear(_read(spec, q, cache, ctx, only), p[N.O], ctx.tp_axis)


def _read(spec: ModelSpec, q: jnp.ndarray, cache: LayerCache, ctx: _Context, only: jnp.ndarray | None):
    """Attention of queries `q` over the (already written) caches, before the output projection."""
    q, mask = _select(q, only), _select(ctx.mask, only)
    read = cache if ctx.first is None else ops.cache_row(cache, ctx.first[0], spec.kv_heads)
    return ops.attend(q, *ops.cache_windows(read, ctx.window, spec.kv_heads, ctx.rep, q.dtype), mask, spec.scale,
                      ctx.bias)


class Serving(NamedTuple):
    """How a serving program's flat token list ``[1, B + C, ...]`` splits: the first `rows` tokens
    are each batch row's decode token (`decode`), the rest a prompt chunk written into one row
    (`prompt`, None when there is no chunk)."""

    rows: int
    decode: _Context
    prompt: _Context | None


def _serving_attention(spec: ModelSpec, p: dict, h: jnp.ndarray, cache: LayerCache, ctx: Serving,
                       only: jnp.ndarray | None):
    """Attention of a serving program's tokens: one qkv and one output product over all of them;
    the decode tokens are written first (the chunk's row gets a placeholder its chunk overwrites),
    then the chunk into its row; each part then reads the written caches (decode rows never read
    the chunk's row). With `only`, the chunk keeps that one token."""
    b = ctx.rows
    q, k, v = _qkv(spec, p, h, None)

    def rows_of(y):  # [1, B + C, ...] -> ([B, 1, ...], [1, C, ...])
        return y[0, :b, None], y[:, b:]

    (qd, qp), (kd, kp), (vd, vp) = rows_of(q), rows_of(k), rows_of(v)
    if spec.positions == "rope":
        qd, kd = (ops.apply_rotary(y, ctx.decode.rotary, spec.rope) for y in (qd, kd))
    cache = ops.update_caches(cache, kd, vd, ctx.decode.slot)
    if ctx.prompt is not None:  # both writes before any read: a read between them would copy the caches
        if spec.positions == "rope":
            qp, kp = (ops.apply_rotary(y, ctx.prompt.rotary, spec.rope) for y in (qp, kp))
        cache = ops.update_caches(cache, kp, vp, ctx.prompt.slot, ctx.prompt.first)
    o = _read(spec, qd, cache, ctx.decode, None).reshape(1, b, -1)
    if ctx.prompt is not None:
        o = jnp.concatenate([o, _read(spec, qp, cache, ctx.prompt, only)], axis=1)
    return ops.row_parallel_linear(o, p[N.O], ctx.decode.tp_axis), cache


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


def layer(spec: ModelSpec, p: dict, x: jnp.ndarray, cache: LayerCache, ctx: _Context | Serving,
          only: jnp.ndarray | None = None):
    """One transformer block, wired as ``spec.block`` says (`BLOCKS`).

    With `only` (a ``[]`` index into the tokens) every token's keys and values still reach the
    cache, but the queries, the attention output and the MLP run for that one token, whose output
    ``[B, 1, hidden]`` is all the block returns (the last layer of a prompt). With a `Serving`
    context the tokens are a serving program's flat list and `only` picks a token of its chunk.
    """
    if isinstance(ctx, Serving):
        b = ctx.rows
        parts = _Parts(
            norm=lambda name, y: _by_part(y, b, lambda z: ops.norm(spec.norm, z, p[name], spec.norm_eps)),
            attention=lambda h: _serving_attention(spec, p, h, cache, ctx, only),
            mlp=lambda y: ops.mlp(y, p, spec.activation, spec.gated_mlp, ctx.decode.tp_axis),
            select=lambda y: y if only is None else jnp.concatenate([y[:, :b], _select(y[:, b:], only)], axis=1),
        )
        return BLOCKS[spec.block](parts, x)
    parts = _Parts(
        norm=lambda name, y: ops.norm(spec.norm, y, p[name], spec.norm_eps),
        attention=lambda h: _attention(spec, p, h, cache, ctx, only),
        mlp=lambda y: ops.mlp(y, p, spec.activation, spec.gated_mlp, ctx.tp_axis),
        select=lambda y: _select(y, only),
    )
    return BLOCKS[spec.block](parts, x)


def _by_part(y: jnp.ndarray, b: int, f: Callable[[jnp.ndarray], jnp.ndarray], axis: int = 1) -> jnp.ndarray:
    """`f` applied to a serving program's decode tokens (the first `b` along `axis`) and to the rest
    separately: a reduction over each token (a norm) rounds differently on XLA:CPU with the number
    of tokens beside it (RMS norm over 576 values: from 8 tokens on), unlike the shared products."""
    if y.shape[axis] == b:
        return f(y)
    head, tail = jnp.split(y, [b], axis=axis)
    return jnp.concatenate([f(head), f(tail)], axis=axis)


class _Context(NamedTuple):
    slot: jnp.ndarray
    rotary: tuple[jnp.ndarray, jnp.ndarray] | None  # (cos, sin) of the tokens' rotary angles
    mask: jnp.ndarray  # [B, T, W]
    bias: jnp.ndarray | None  # [B, H, W] ALiBi
    window: int
    tp_axis: str | None  # mesh axis name when running one tensor-parallel shard
    rep: int  # cache rows per token row: > 1 when one prompt row fills several (context broadcasting)
    first: jnp.ndarray | None  # [1]: the batch row an insert writes and reads (None: token row i is row i*rep)


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
):
    """Run the decoder on ``inp.tokens``; return (logits ``[B, vocab]`` f32, updated caches).

    With fewer token rows than cache rows (context broadcasting), prompt row ``i`` fills cache
    rows ``i*rep .. i*rep+rep-1`` and the logits are repeated the same way.

    With `insert` (a serving program, continuous batching) the inputs hold every batch row's
    decode token and possibly a prompt chunk (see the packing above `step`), written into batch
    row ``inp.row`` and attending over that row only. All of them run as one flat token list
    through shared products (call it inside `nx.ops.uniform_rows`, so no token's products depend
    on the others); the logits are ``[B (+ 1), vocab]``: the decode rows, then the chunk's token
    `last`.

    Under tensor parallelism (inside ``shard_map`` over `tp_axis`) `spec` is the shard's local spec
    (its share of heads and MLP width) and `vocab_size` the model's full vocabulary.

    With `unroll` (a block size, see `nx.scan`) the layers run as a ``lax.scan`` over stacked blocks.
    """
    if insert:  # a serving program: every row's decode token, then maybe a chunk, as one flat token list
        b = caches[0][0].shape[-3] // spec.kv_heads
        decode = StepInputs(inp.tokens[:b, :1], inp.slot[:b], inp.pad[:b], jnp.zeros((), jnp.int32), inp.row)
        x, ctx_d = _embed(spec, params, decode, window, tp_axis, 1, None)
        x, ctx_p, t = x.reshape(1, b, -1), None, 1
        if inp.tokens.shape[0] > b:
            prompt = StepInputs(inp.tokens[b:], inp.slot[b:], inp.pad[b:], inp.last, inp.row)
            xp, ctx_p = _embed(spec, params, prompt, window, tp_axis, 1, inp.row[None])
            x, t = jnp.concatenate([x, xp], axis=1), prompt.tokens.shape[1]
        ctx = Serving(b, ctx_d, ctx_p)
    else:
        b, t = inp.tokens.shape
        rep = caches[0][0].shape[-3] // (spec.kv_heads * b)  # caches are [[blocks,] kv_heads * batch, ., .]
        x, ctx = _embed(spec, params, inp, window, tp_axis, rep, None)
    if unroll is None:
        # the last layer computes only the token whose logits are returned (see `layer`)
        only = [None] * (len(caches) - 1) + [inp.last if t > 1 else None]
        new_caches = []
        for p, cache, one in zip(params["layers"], caches, only):
            x, cache = layer(spec, p, x, cache, ctx, one)
            new_caches.append(cache)
    else:  # stacked weights and caches of blocks of `unroll` layers (see nx.scan)
        x, new_caches = scan.run_layers(lambda p, y, c: layer(spec, p, y, c, ctx), params["layers"], caches, x)

    if insert:  # [B (+ 1), hidden]: the decode rows, then the chunk's token `last`
        y = x[0]
        if unroll is not None and ctx.prompt is not None:
            y = jnp.concatenate([y[:b], jnp.take(y[b:], inp.last, axis=0)[None]])
        return _head(spec, params, y, vocab_size, tp_axis, b), new_caches
    # [B, hidden]: one token per row reaches the lm head (the unrolled last layer kept only that one)
    x = x[:, 0] if unroll is None else jnp.take(x, inp.last, axis=1)
    logits = _head(spec, params, x, vocab_size, tp_axis)
    return (jnp.repeat(logits, ctx.rep, axis=0) if ctx.rep > 1 else logits), new_caches


def _embed(spec: ModelSpec, params: dict, inp: StepInputs, window: int, tp_axis: str | None, rep: int,
           first: jnp.ndarray | None) -> tuple[jnp.ndarray, _Context]:
    """The embedded tokens ``[B, T, hidden]`` and what every layer needs to place and mask them."""
    t = inp.tokens.shape[1]
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
    rotary = ops.rotary_tables(positions, spec.rope, window) if spec.positions == "rope" else None
    mask = ops.causal_padding_mask(slot, inp.pad, t, window)
    return x, _Context(slot, rotary, mask, bias, window, tp_axis, rep, first)


def _head(spec: ModelSpec, params: dict, x: jnp.ndarray, vocab_size: int | None, tp_axis: str | None,
          decode_rows: int | None = None) -> jnp.ndarray:
    """f32 logits ``[B, vocab]`` of hidden states ``[B, hidden]`` (a serving program's: the first
    `decode_rows` normed apart from the rest, see `_by_part`)."""
    if spec.final_norm:
        def norm(z):
            return ops.norm(spec.norm, z, params[N.FINAL_NORM], spec.norm_eps)

        x = norm(x) if decode_rows is None else _by_part(x, decode_rows, norm, axis=0)
    if spec.project_dim:
        x = ops.linear(x, params[N.PROJECT_OUT])
    head = params.get(N.LM_HEAD, {})
    table = params[N.EMBED][N.W] if spec.tied_lm_head else head[N.W]
    return ops.logits(x, table, head.get(N.B), vocab_size or spec.vocab_size, tp_axis)


def _local_alibi_slopes(spec: ModelSpec, tp_axis: str | None) -> jnp.ndarray:
    """ALiBi slopes of this shard's heads (all heads without tensor parallelism)."""
    if tp_axis is None:
        return jnp.asarray(ops.alibi_slopes(spec.n_heads))
    tp = lax.psum(1, tp_axis)
    slopes = jnp.asarray(ops.alibi_slopes(spec.n_heads * tp))
    return lax.dynamic_slice_in_dim(slopes, lax.axis_index(tp_axis) * spec.n_heads, spec.n_heads)
