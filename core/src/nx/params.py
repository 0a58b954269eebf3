"""Turning a checkpoint into nx's parameter tree, with early, precise errors."""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from nx.errors import CheckpointError, PluginError, ShapeMismatchError, WeightKeyError
from nx.family import Family, Weight
from nx.names import is_known
from nx.progress import track
from nx.quant import QuantizedArray
from nx.spec import ModelSpec


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
    """Read, convert and shape-check every parameter; returns the nested numpy tree.

    A checkpoint holding NaN or inf in any weight is refused with a `CheckpointError` naming the
    tensors (after all are read, so the message lists every one): such a model can only produce
    NaN logits, which greedy decoding turns into token 0 forever."""
    weight_map = family.weights(spec)
    unknown = sorted(n for n in weight_map if not is_known(n))
    if unknown:
        raise PluginError(
            f"the {family.name} plugin maps checkpoint tensors to unknown nx parameter names {_few(set(unknown))}; "
            "a plugin must use the names in nx.names (e.g. layers.0.qkv.w); fix or update the plugin"
        )
    check_keys(family, weight_map, set(tensors))
    flat: dict[str, np.ndarray] = {}
    non_finite: set[str] = set()

    def build(item: tuple[str, Weight]) -> tuple[str, Any, bool]:
        name, w = item
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
        out = out if isinstance(out, QuantizedArray) else np.asarray(out, dtype=dtype)  # GGUF blocks stay
        return name, out, not isinstance(out, QuantizedArray) and not all_finite(out)

    # Tensors are read, converted and checked on every core: numpy and the readers release the GIL.
    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        built = pool.map(build, weight_map.items())
        for name, out, bad in track(built, "loading weights", total=len(weight_map), enabled=progress):
            flat[name] = out
            if bad:
                non_finite.update(weight_map[name].keys)
    if non_finite:
        raise CheckpointError(
            f"checkpoint tensor(s) {_few(non_finite)} hold NaN or infinite values, so the model can only "
            "produce NaN logits; the file is damaged or the training diverged: use another copy or checkpoint"
        )
    return nest(flat, spec.n_layers)


def all_finite(a: np.ndarray) -> bool:
    """Whether float array `a` has no NaN or inf. Its min and max are NaN or infinite if any element
    is: two reductions, no temporary array the size of `a`."""
    if not np.issubdtype(a.dtype, np.floating) or a.size == 0:
        return True
    return bool(np.isfinite(a.min()) and np.isfinite(a.max()))


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
