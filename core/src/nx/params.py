"""Turning a checkpoint into nx's parameter tree, with early, precise errors."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import numpy as np

from nx.errors import ShapeMismatchError, WeightKeyError
from nx.family import Family, Weight
from nx.progress import track
from nx.quant import QuantizedArray
from nx.spec import ModelSpec

#: Tensor-parallel role of each parameter by its name within a layer / the model. Column-parallel
#: weights split their output dim, row-parallel ones their input dim (followed by an all-reduce).
ROLES: dict[str, str] = {
    "qkv.w": "column",
    "qkv.b": "column",
    "up.w": "column",
    "up.b": "column",
    "o.w": "row",
    "down.w": "row",
    "embed.w": "vocab",
    "lm_head.w": "vocab",
    "lm_head.b": "vocab",
}


def role(name: str) -> str:
    """The sharding role of a parameter name such as ``layers.3.qkv.w`` ("replicated" if none).

    Leaves below a weight (e.g. ``qkv.w.q`` / ``qkv.w.scale`` of a quantized weight) share its role.
    """
    parts = name.split(".")
    if parts[0] == "layers":
        parts = parts[2:]
    return ROLES.get(".".join(parts[:2]), "replicated")


def _few(keys: set[str], n: int = 6) -> str:
    ks = sorted(keys)
    more = f" ... and {len(ks) - n} more" if len(ks) > n else ""
    return ", ".join(ks[:n]) + more


def check_keys(family: Family, weight_map: Mapping[str, Weight], available: set[str]) -> None:
    """Fail before reading any tensor if keys are missing or unexpected."""
    needed = {k for w in weight_map.values() for k in w.keys}
    missing = needed - available
    ignored = {k for k in available if any(re.fullmatch(p, k) for p in family.ignore)}
    unexpected = available - needed - ignored
    if missing:
        raise WeightKeyError(
            f"checkpoint is missing {len(missing)} weight(s) the {family.name} family needs: {_few(missing)}. "
            "Is it a complete checkpoint of this family (all shards present, config.json matching)?"
        )
    if unexpected:
        raise WeightKeyError(
            f"checkpoint has {len(unexpected)} unexpected weight(s) for the {family.name} family: "
            f"{_few(unexpected)}. It may belong to another architecture or a newer variant; "
            "check config.json's model_type."
        )


def build_params(
    family: Family, spec: ModelSpec, tensors: Mapping[str, np.ndarray], dtype: Any = np.float32, progress: bool | None = None
) -> dict:
    """Read, convert and shape-check every parameter; returns the nested numpy tree."""
    weight_map = family.weights(spec)
    check_keys(family, weight_map, set(tensors))
    flat: dict[str, np.ndarray] = {}
    for name, w in track(weight_map.items(), "loading weights", total=len(weight_map), enabled=progress):
        arrays = [tensors[k] for k in w.keys]
        try:
            out = w.build(*arrays)
        except ValueError as exc:
            got = ", ".join(f"{k}{tuple(a.shape)}" for k, a in zip(w.keys, arrays))
            raise ShapeMismatchError(
                f"cannot build {name} of shape {w.shape} from {got}: {exc}. The weights do not match config.json"
            ) from exc
        if tuple(out.shape) != tuple(w.shape):
            got = ", ".join(f"{k}{tuple(a.shape)}" for k, a in zip(w.keys, arrays))
            raise ShapeMismatchError(
                f"{name} should have shape {w.shape} but the checkpoint gives {tuple(out.shape)} (from {got}); "
                "the weights do not match config.json"
            )
        flat[name] = out if isinstance(out, QuantizedArray) else np.asarray(out, dtype=dtype)  # GGUF blocks stay
    return nest(flat, spec.n_layers)


def nest(flat: dict[str, Any], n_layers: int) -> dict:
    """``{"layers.0.qkv.w": a}`` -> ``{"layers": [{"qkv": {"w": a}}, ...]}``."""
    tree: dict = {"layers": [{} for _ in range(n_layers)]}
    for name, value in flat.items():
        parts = name.split(".")
        node: Any = tree
        if parts[0] == "layers":
            node, parts = tree["layers"][int(parts[1])], parts[2:]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return tree
