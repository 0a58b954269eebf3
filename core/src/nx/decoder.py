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
from typing import Any, NamedTuple

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


# An insert program's inputs pack both of its streams into one StepInputs of B + 1 rows: rows
# 0..B-1 are the decode tokens (column 0; slot and pad per row as a decode step takes them), row B
# is the prompt chunk written into batch row `row` from `slot[B]`, `last` indexes that chunk.


def _attention(spec: ModelSpec, p: dict, h: jnp.ndarray, cache: LayerCache, ctx: _Context, only: jnp.ndarray | None = None):
    q, k, v = _qkv(spec, p, h, ctx)
    cache = ops.update_caches(cache, k, v, ctx.slot, ctx.first, ctx.rep)
    return _attend(spec, p, q, cache, ctx, only), cache


def _qkv(spec: ModelSpec, p: dict, h: jnp.ndarray, ctx: _Context):
    """Queries, keys and values ``[B, T, heads, head_dim]`` of the normed input (rotary applied)."""
    b, t, _ = h.shape
    qkv = ops.linear(h, p[N.QKV])
    nq, nkv = spec.n_heads * spec.head_dim, spec.kv_heads * spec.head_dim
    q = qkv[..., :nq].reshape(b, t, spec.n_heads, spec.head_dim)
    k = qkv[..., nq : nq + nkv].reshape(b, t, spec.kv_heads, spec.head_dim)
    v = qkv[..., nq + nkv :].reshape(b, t, spec.kv_heads, spec.head_dim)
    if spec.positions == "rope":
        q = ops.apply_rotary(q, ctx.rotary, spec.rope)
        k = ops.apply_rotary(k, ctx.rotary, spec.rope)
    return q, k, v


def _attend(spec: ModelSpec, p: dict, q: jnp.ndarray, cache: LayerCache, ctx: _Context, only: jnp.ndarray | None):
    """The attention output projection of queries `q` over the (already written) caches."""
    q, mask = _select(q, only), _select(ctx.mask, only)
    read = cache if ctx.first is None else ops.cache_row(cache, ctx.first[0], spec.kv_heads)
    o = ops.attend(q, *ops.cache_windows(read, ctx.window, spec.kv_heads, ctx.rep, q.dtype), mask, spec.scale, ctx.bias)
    return ops.row_parallel_linear(o, p[N.O], ctx.tp_axis)


class Pair(NamedTuple):
    """The two token streams of an insert program: every row's decode token ``[B, 1, ...]`` and
    one prompt chunk ``[1, C, ...]``. Each stream runs its own products (a matmul's rounding
    depends on its row count on XLA:CPU, so a decode row computed beside a prompt chunk must see
    exactly the products of a plain decode step); `+` adds stream by stream."""

    decode: Any
    prompt: Any

    def __add__(self, other: Pair) -> Pair:  # type: ignore[override]
        return Pair(self.decode + other.decode, self.prompt + other.prompt)

    def map(self, f: Callable[..., Any], *others: Pair) -> Pair:
        return Pair(f(self.decode, *(o.decode for o in others)), f(self.prompt, *(o.prompt for o in others)))


def _pair_attention(spec: ModelSpec, p: dict, h: Pair, cache: LayerCache, ctx: Pair, only: jnp.ndarray | None):
    """Both streams' attention: the decode tokens are written first (the inserted row's is a
    placeholder at a position its prompt overwrites), then the prompt into its row; each stream
    then reads the written caches (decode rows never read the inserted row)."""
    qd, kd, vd = _qkv(spec, p, h.decode, ctx.decode)
    qp, kp, vp = _qkv(spec, p, h.prompt, ctx.prompt)
    cache = ops.update_caches(cache, kd, vd, ctx.decode.slot)
    cache = ops.update_caches(cache, kp, vp, ctx.prompt.slot, ctx.prompt.first)
    return Pair(_attend(spec, p, qd, cache, ctx.decode, None), _attend(spec, p, qp, cache, ctx.prompt, only)), cache


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


def layer(spec: ModelSpec, p: dict, x, cache: LayerCache, ctx, only: jnp.ndarray | None = None):
    """One transformer block, wired as ``spec.block`` says (`BLOCKS`).

    With `only` (a ``[]`` index into the tokens) every token's keys and values still reach the
    cache, but the queries, the attention output and the MLP run for that one token, whose output
    ``[B, 1, hidden]`` is all the block returns (the last layer of a prompt). With a `Pair` of
    streams (`x` and `ctx`, an insert program) each stream runs its own norms and products and
    `only` applies to the prompt stream.
    """
    if isinstance(x, Pair):
        parts = _Parts(
            norm=lambda name, y: y.map(lambda z: ops.norm(spec.norm, z, p[name], spec.norm_eps)),
            attention=lambda h: _pair_attention(spec, p, h, cache, ctx, only),
            mlp=lambda y: y.map(lambda z: ops.mlp(z, p, spec.activation, spec.gated_mlp, ctx.decode.tp_axis)),
            select=lambda y: Pair(y.decode, _select(y.prompt, only)),
        )
        return BLOCKS[spec.block](parts, x)
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

    With `insert` (continuous batching) the inputs hold two streams (see the packing above
    `step`): every batch row's decode token, exactly as a decode step computes it, and a prompt
    chunk written into batch row ``inp.row`` and attending over that row only; the logits are
    ``[B + 1, vocab]``: the B decode rows, then the chunk's token `last`.

    Under tensor parallelism (inside ``shard_map`` over `tp_axis`) `spec` is the shard's local spec
    (its share of heads and MLP width) and `vocab_size` the model's full vocabulary.

    With `unroll` (a block size, see `nx.scan`) the layers run as a ``lax.scan`` over stacked blocks.
    """
    if insert:
        b = inp.tokens.shape[0] - 1
        decode = StepInputs(inp.tokens[:b, :1], inp.slot[:b], inp.pad[:b], jnp.zeros((), jnp.int32), inp.row)
        prompt = StepInputs(inp.tokens[b:], inp.slot[b:], inp.pad[b:], inp.last, inp.row)
        xd, ctx_d = _embed(spec, params, decode, window, tp_axis, 1, None)
        xp, ctx_p = _embed(spec, params, prompt, window, tp_axis, 1, inp.row[None])
        x, ctx, t = Pair(xd, xp), Pair(ctx_d, ctx_p), prompt.tokens.shape[1]
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

    def last_token(y, last):  # [B, hidden]: the unrolled last layer kept only that token
        return y[:, 0] if unroll is None else jnp.take(y, last, axis=1)

    if insert:
        return jnp.concatenate([_head(spec, params, last_token(x.decode, 0), vocab_size, tp_axis),
                                _head(spec, params, last_token(x.prompt, inp.last), vocab_size, tp_axis)]), new_caches
    logits = _head(spec, params, last_token(x, inp.last), vocab_size, tp_axis)
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


def _head(spec: ModelSpec, params: dict, x: jnp.ndarray, vocab_size: int | None, tp_axis: str | None) -> jnp.ndarray:
    """f32 logits ``[B, vocab]`` of hidden states ``[B, hidden]``."""
    if spec.final_norm:
        x = ops.norm(spec.norm, x, params[N.FINAL_NORM], spec.norm_eps)
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
