"""LayerNorm and RMSNorm, computed in f32 like the reference implementations."""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax


def layer_norm(x: jnp.ndarray, w: jnp.ndarray | None, b: jnp.ndarray | None, eps: float) -> jnp.ndarray:
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    y = (xf - mean) * lax.rsqrt(var + eps)
    if w is not None:
        y = y * w
    if b is not None:
        y = y + b
    return y.astype(x.dtype)


def rms_norm(x: jnp.ndarray, w: jnp.ndarray | None, eps: float) -> jnp.ndarray:
    xf = x.astype(jnp.float32)
    y = xf * lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + eps)
    if w is not None:
        y = y * w
    return y.astype(x.dtype)


def norm(kind: str, x: jnp.ndarray, p: dict, eps: float) -> jnp.ndarray:
    """Apply the norm `kind` ("layer" or "rms") with parameters ``p = {"w": ..., "b": ...}``."""
    if kind == "rms":
        return rms_norm(x, p.get("w"), eps)
    return layer_norm(x, p.get("w"), p.get("b"), eps)
