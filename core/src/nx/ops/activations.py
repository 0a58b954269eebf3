"""Activation functions by nx name (HF's many aliases are mapped by `nx.config.activation_name`)."""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

_ACTIVATIONS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "relu": jax.nn.relu,
    "silu": jax.nn.silu,
}


def activation(name: str) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """The activation `name`; a 16-bit input is computed in f32 and rounded once to its dtype.

    Why: torch's activation kernels compute 16-bit tensors in f32 and round the result once, so
    this is what HF's bf16 / f16 models do; rounding after each of the function's own ops (neg,
    exp, add, divide, ...) drifted further from them and cost a dozen conversions per value."""
    f = _ACTIVATIONS[name]

    def apply(x: jnp.ndarray) -> jnp.ndarray:
        if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
            return f(x.astype(jnp.float32)).astype(x.dtype)
        return f(x)

    return apply
