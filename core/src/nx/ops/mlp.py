"""Feed-forward blocks: plain ``act(x W1) W2`` and gated ``(act(x Wg) * x Wu) W2`` (SwiGLU)."""

from __future__ import annotations

import jax.numpy as jnp

from nx import names as N
from nx.ops.activations import activation
from nx.ops.linear import gated_linear, linear, row_parallel_linear


def mlp(x: jnp.ndarray, p: dict, act: str, gated: bool, axis: str | None = None) -> jnp.ndarray:
    """`p` holds ``up`` (for gated MLPs gate and up fused as ``[in, 2*inter]``) and ``down``.
    With tensor-parallel `axis`, ``up`` is column-split and ``down`` row-split (one all-reduce)."""
    h = gated_linear(x, p[N.UP], act) if gated else activation(act)(linear(x, p[N.UP]))
    return row_parallel_linear(h, p[N.DOWN], axis)
