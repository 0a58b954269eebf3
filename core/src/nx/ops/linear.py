"""Dense layers. Weights are stored ``[in, out]`` so activations multiply on the left."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def linear(x: jnp.ndarray, p: dict) -> jnp.ndarray:
    """``x @ w + b`` for ``p = {"w": [in, out], "b": [out] (optional)}``."""
    y = jnp.matmul(x, p["w"].astype(x.dtype))
    if p.get("b") is not None:
        y = y + p["b"]
    return y


def lm_head(x: jnp.ndarray, table: jnp.ndarray, bias: jnp.ndarray | None = None) -> jnp.ndarray:
    """f32 logits from hidden states; `table` is ``[vocab, hidden]`` (tied embedding or lm head)."""
    dims = (((x.ndim - 1,), (1,)), ((), ()))
    y = lax.dot_general(x, table.astype(x.dtype), dims, preferred_element_type=jnp.float32)
    if bias is not None:
        y = y + bias
    return y
