"""Helpers for reading Hugging Face configs, shared by family plugins."""

from __future__ import annotations

import math
import numbers
from typing import Any

from nx.errors import ConfigError

#: Size fields of HF configs under their names across families: where present and not null, each
#: must be a positive int (checked before transformers or a plugin divides by one of them).
SIZE_FIELDS = (
    "vocab_size", "hidden_size", "n_embd", "d_model", "num_hidden_layers", "n_layer", "num_layers",
    "num_attention_heads", "n_head", "num_key_value_heads", "intermediate_size", "n_inner", "ffn_dim",
    "max_position_embeddings", "n_positions", "n_ctx", "head_dim", "rotary_dim", "word_embed_proj_dim",
)
_HIDDEN = ("hidden_size", "n_embd", "d_model")
_HEADS = ("num_attention_heads", "n_head")


def check_raw_config(raw: dict, where: str) -> None:
    """Reject a config dict (config.json, or fields read from GGUF metadata) whose sizes cannot
    describe a model: a size that is not a positive int, heads not dividing the hidden size (unless
    ``head_dim`` is given), heads not a multiple of the kv heads. Raises `ConfigError` naming the
    field; runs before transformers builds the config, which would divide by zero on some of them."""

    def first(names: tuple[str, ...]) -> tuple[str, Any]:
        return next(((n, raw[n]) for n in names if raw.get(n) is not None), ("", None))

    for name in SIZE_FIELDS:
        value = raw.get(name)
        if value is not None and (not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < 1):
            raise ConfigError(f"{where}: {name}={value!r} must be a positive int; fix the config")
    (hidden_name, hidden), (heads_name, heads) = first(_HIDDEN), first(_HEADS)
    if hidden is not None and heads is not None and raw.get("head_dim") is None and hidden % heads:
        raise ConfigError(
            f"{where}: {hidden_name}={hidden} is not divisible by {heads_name}={heads}; fix the config "
            "(or give head_dim)"
        )
    kv = raw.get("num_key_value_heads")
    if heads is not None and kv is not None and heads % kv:
        raise ConfigError(
            f"{where}: {heads_name}={heads} is not a multiple of num_key_value_heads={kv}; fix the config"
        )

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
    if not isinstance(hf_name, str) or hf_name not in _ACTIVATIONS:
        raise ConfigError(
            f"{model_type}: activation {hf_name!r} is not supported; supported: {', '.join(sorted(_ACTIVATIONS))}"
        )
    return _ACTIVATIONS[hf_name]


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
    if not isinstance(kind, str) or kind not in _ROPE_TYPES:
        raise ConfigError(
            f"{cfg.model_type}: rope scaling {kind!r} is not supported yet; supported: {', '.join(sorted(_ROPE_TYPES))}"
        )
    theta = positive_number(theta, "rope_theta", cfg.model_type)
    if kind == "default":
        return theta, None
    return theta, tuple(sorted(scaling.items()))


def partial_rotary_factor(cfg: Any, default: float = 1.0) -> float:
    """Fraction of each head's dims that rotary rotates, from transformers 5's ``rope_parameters``
    (``partial_rotary_factor``) or transformers 4's ``partial_rotary_factor`` / ``rotary_pct``."""
    params = dict(getattr(cfg, "rope_parameters", None) or {})
    value = params.get("partial_rotary_factor")
    if value is None:
        value = get(cfg, "partial_rotary_factor", "rotary_pct", default=default)
    return positive_number(value, "partial_rotary_factor", getattr(cfg, "model_type", ""))


def positive_number(value: Any, name: str, model_type: str = "") -> float:
    """Config field `name` as a float, if it is a finite number > 0; else a `ConfigError`."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0
    if not ok:
        raise ConfigError(f"{model_type}: {name}={value!r} must be a finite number > 0; fix the config")
    return float(value)


def get(cfg: Any, *names: str, default: Any = None) -> Any:
    """The first attribute of `cfg` among `names` that is set (configs rename fields over time)."""
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


class ResolvedConfig:
    """A Hugging Face model config as plain data: every field transformers resolved for it
    (defaults included, ``to_dict()``), read by attribute like the ``PretrainedConfig`` it came
    from, its ``attribute_map`` aliases too (GPT-2's ``hidden_size`` is ``n_embd``).

    nx and family plugins read configs only through it, so a load whose config was resolved
    before (`nx.compile_cache.CompileCache.hf_config`, an artifact's manifest) needs no
    transformers config class: importing one imports torch, seconds of start-up.
    """

    def __init__(self, values: dict, aliases: dict | None = None) -> None:
        object.__setattr__(self, "_values", dict(values))
        object.__setattr__(self, "_aliases", dict(aliases or {}))

    @classmethod
    def of(cls, config: Any) -> ResolvedConfig:
        """The resolved form of a transformers ``PretrainedConfig`` (or of another resolved one)."""
        if isinstance(config, ResolvedConfig):
            return config
        return cls(config.to_dict(), getattr(type(config), "attribute_map", None) or {})

    @classmethod
    def from_json(cls, data: Any) -> ResolvedConfig:
        """From `to_json` output; `ConfigError` if it is not that."""
        if not (isinstance(data, dict) and isinstance(data.get("values"), dict) and isinstance(data.get("aliases"), dict)
                and isinstance(data["values"].get("model_type"), str)):
            raise ConfigError("a saved resolved config is not {values, aliases} with a model_type")
        return cls(data["values"], data["aliases"])

    def to_json(self) -> dict:
        return {"values": dict(self._values), "aliases": dict(self._aliases)}

    def __getattr__(self, name: str) -> Any:
        values = self.__dict__.get("_values", {})  # (unpickling calls this before __init__)
        name = self.__dict__.get("_aliases", {}).get(name, name)
        try:
            return values[name]
        except KeyError:
            raise AttributeError(f"the {values.get('model_type', '?')} config has no field {name!r}") from None

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("a resolved config is read-only")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ResolvedConfig) and self.to_json() == other.to_json()

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict:
        return dict(self._values)

    def to_transformers(self) -> Any:
        """The transformers config object (imports transformers, and torch with it)."""
        from transformers import AutoConfig

        values = dict(self._values)
        return AutoConfig.for_model(values.pop("model_type"), **values)

    def save_pretrained(self, directory: Any) -> None:
        """``config.json`` in `directory`, as transformers writes it."""
        self.to_transformers().save_pretrained(str(directory))

    def __repr__(self) -> str:
        return f"ResolvedConfig({self._values.get('model_type')!r}, {len(self._values)} fields)"
