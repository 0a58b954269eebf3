"""Helpers for reading Hugging Face configs, shared by family plugins."""

from __future__ import annotations

from typing import Any

from nx.errors import ConfigError

_ACTIVATIONS = {
    "gelu": "gelu",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "bloom_gelu": "gelu_tanh",
    "relu": "relu",
    "silu": "silu",
    "swish": "silu",
}


def activation_name(hf_name: str, model_type: str = "") -> str:
    """nx's activation for an HF ``hidden_act`` / ``activation_function`` string."""
    try:
        return _ACTIVATIONS[hf_name]
    except KeyError:
        raise ConfigError(
            f"{model_type}: activation {hf_name!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}"
        ) from None


_ROPE_TYPES = {"default", "linear", "llama3"}


def rope_parameters(cfg: Any, default_theta: float = 10000.0, theta_attr: str = "rope_theta"):
    """(theta, scaling) from a config in either transformers 4 (``rope_theta`` + ``rope_scaling``)
    or transformers 5 (``rope_parameters``) form; `scaling` is a sorted tuple of items or None."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    legacy = dict(getattr(cfg, "rope_scaling", None) or {})
    theta = params.pop("rope_theta", None) or getattr(cfg, theta_attr, None) or default_theta
    scaling = {**legacy, **params}
    scaling.pop("rope_theta", None)
    scaling.pop("partial_rotary_factor", None)
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in _ROPE_TYPES:
        raise ConfigError(
            f"{cfg.model_type}: rope scaling {kind!r} is not supported yet; supported: {', '.join(sorted(_ROPE_TYPES))}"
        )
    if kind == "default":
        return float(theta), None
    return float(theta), tuple(sorted(scaling.items()))


def partial_rotary_factor(cfg: Any, default: float = 1.0) -> float:
    """Fraction of each head's dims that rotary rotates, from transformers 5's ``rope_parameters``
    (``partial_rotary_factor``) or transformers 4's ``partial_rotary_factor`` / ``rotary_pct``."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    value = params.get("partial_rotary_factor")
    if value is None:
        value = get(cfg, "partial_rotary_factor", "rotary_pct", default=default)
    return float(value)


def get(cfg: Any, *names: str, default: Any = None) -> Any:
    """The first attribute of `cfg` among `names` that is set (configs rename fields over time)."""
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default
