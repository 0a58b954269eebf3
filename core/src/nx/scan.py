"""Scanned layers: ``unroll=k`` compiles a block of `k` layers once and loops over it.

By default (``unroll=None``) every layer is unrolled into the program, each with its own weight and
cache arguments: the fastest code on CPU, but compile time grows with depth. With ``unroll=k`` the
program runs ``lax.scan`` over ``n_layers / k`` blocks of `k` unrolled layers, so XLA compiles `k`
layers instead of `n_layers`. For that the layer weights are stacked per position in the block:
``params["layers"]`` becomes `k` trees whose leaves have a leading ``n_layers / k`` axis, and each
cache gets a leading ``n_layers / k`` axis. Slicing stacked weights
inside the loop is what the fully unrolled default avoids; `benchmarks/unroll.py` measures the
compile-time vs speed trade-off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
from jax import lax

from nx.errors import ConfigError


def block_size(n_layers: int, unroll: int | None) -> int | None:
    """The scanned block size for `unroll` (None when every layer is unrolled)."""
    if unroll is None:
        return None
    valid = [k for k in range(1, n_layers + 1) if n_layers % k == 0]
    if not isinstance(unroll, int) or isinstance(unroll, bool) or unroll not in valid:
        raise ConfigError(
            f"unroll={unroll!r} must divide the model's {n_layers} layers; valid values: {valid} "
            "(or None to unroll every layer)"
        )
    return None if unroll == n_layers else unroll


def stack(layers: list[Any], k: int) -> list[Any]:
    """`k` host (numpy) trees: tree ``j`` stacks layers ``j, j + k, j + 2k, ...`` (block ``i`` =
    layers ``i*k .. i*k+k-1``).

    Consumes `layers` (the list is emptied and each layer's array is released once copied), so the
    host holds the stacked model plus one layer's tensor, not two copies of every layer weight.
    """
    import numpy as np

    flat = [jax.tree.flatten(layer) for layer in layers]
    layers.clear()  # from here `flat` holds the only references to the per-layer arrays
    blocks = []
    for j in range(k):
        rows = [leaves for leaves, _ in flat[j::k]]
        stacked = []
        for i, first in enumerate(rows[0]):
            out = np.empty((len(rows), *np.shape(first)), np.asarray(first).dtype)
            for n, leaves in enumerate(rows):
                out[n], leaves[i] = leaves[i], None
            stacked.append(out)
        blocks.append(flat[j][1].unflatten(stacked))
    return blocks


def unstack(blocks: list[Any]) -> list[Any]:
    """The per-layer list `stack` was made from."""
    n_blocks = jax.tree.leaves(blocks[0])[0].shape[0]
    return [jax.tree.map(lambda a, i=i: a[i], blocks[j]) for i in range(n_blocks) for j in range(len(blocks))]


def stack_specs(specs: list[Any], k: int) -> list[Any]:
    """Partition specs of `stack`'s output: each layer's spec with an unsharded leading axis."""
    from jax.sharding import PartitionSpec as P

    def lead(ps: P) -> P:
        return P(None, *ps)

    return [jax.tree.map(lead, specs[j], is_leaf=lambda x: isinstance(x, P)) for j in range(k)]


def run_layers(layer: Callable, blocks: list[Any], caches: list[Any], x: Any) -> tuple[Any, list[Any]]:
    """``x`` through every block: ``layer(p, x, cache) -> (x, cache)`` for each of the `k` layers of a
    block, the block repeated by ``lax.scan``. Caches are loop-carried and written back in place."""

    def body(carry, block_params):
        x, caches, i = carry
        out = []
        for p, pair in zip(block_params, caches):
            mine = tuple(lax.dynamic_index_in_dim(c, i, 0, keepdims=False) for c in pair)
            x, mine = layer(p, x, mine)
            out.append(tuple(lax.dynamic_update_index_in_dim(c, m, i, 0) for c, m in zip(pair, mine)))
        return (x, out, i + 1), None

    (x, caches, _), _ = lax.scan(body, (x, list(caches), jax.numpy.int32(0)), list(blocks))
    return x, caches
