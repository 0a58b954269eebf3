"""Feed-forward blocks: plain ``act(x W1) W2`` and gated ``(act(x Wg) * x Wu) W2`` (SwiGLU)."""

from __future__ import annotations

import jax.numpy as jnp

from nx import names as N
from nx.ops.activations import activation
from nx.ops.linear import linear, row_parallel_linear


def mlp(x: jnp.ndarray, p: dict, act: str, gated: bool, axis: str | None = None) -> jnp.ndarray:
    """`p` holds ``up`` (for gated MLPs gate and up fused as ``[in, 2*inter]``) and ``down``.
    With tensor-parallel `axis`, ``up`` is column-split and ``down`` row-split (one all-reduce)."""
    h = linear(x, p[N.UP])
    if gated:
        gate, up = jnp.split(h, 2, axis=-1)
        h = activation(act)(gate) * up
    else:
        h = activation(act)(h)
    return row_parallel_linear(h, p[N.DOWN], axis)
