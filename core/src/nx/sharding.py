"""Tensor parallelism: how parameters and KV caches are laid out over a 1-D ``tp`` mesh.

Column-parallel weights (fused q/k/v, fused gate/up) split their output dim (the rows of nx's
``[out, in]`` weights), row-parallel ones (attention output, MLP down) their input dim (the
columns) and are followed by one all-reduce; embedding and lm head are split over the vocabulary.
Fused matrices are re-laid out on the host so that each shard's contiguous block of rows holds
its own heads: ``[q_s | k_s | v_s]`` per shard ``s``. With fewer kv
heads than shards (GQA/MQA), each shard gets a copy of the kv head its query heads use.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from nx import names
from nx.errors import ConfigError
from nx.names import role
from nx.spec import ModelSpec

AXIS = "tp"


def valid_degrees(spec: ModelSpec, limit: int = 64) -> list[int]:
    """Every tp degree this model's head and MLP sizes allow (up to `limit`)."""
    return [d for d in range(1, limit + 1) if _fits(spec, d)]


def _fits(spec: ModelSpec, tp: int) -> bool:
    kv = spec.kv_heads
    return (
        spec.n_heads % tp == 0
        and (kv % tp == 0 or tp % kv == 0)
        and spec.intermediate_size % tp == 0
    )


def check_degree(spec: ModelSpec, tp: int) -> None:
    if not isinstance(tp, int) or tp < 1:
        raise ConfigError(f"tp_degree must be a positive int, got {tp!r}")
    if not _fits(spec, tp):
        raise ConfigError(
            f"tp_degree={tp} does not divide this model: {spec.n_heads} attention heads, {spec.kv_heads} kv heads, "
            f"MLP width {spec.intermediate_size}. Valid tp degrees: {valid_degrees(spec)} (tp_degree= in Python, "
            "--tp on the command line)"
        )


def local_spec(spec: ModelSpec, tp: int) -> ModelSpec:
    """The spec one shard computes: its share of heads and MLP width."""
    if tp == 1:
        return spec
    return replace(
        spec,
        n_heads=spec.n_heads // tp,
        n_kv_heads=max(spec.kv_heads // tp, 1),
        intermediate_size=spec.intermediate_size // tp,
    )


def cache_kv_heads(spec: ModelSpec, tp: int) -> int:
    """kv heads stored in the global cache (replicated kv heads are stored once per shard)."""
    return spec.kv_heads if spec.kv_heads % tp == 0 else tp


def padded_vocab(spec: ModelSpec, tp: int) -> int:
    return -(-spec.vocab_size // tp) * tp


def _qkv_rows(spec: ModelSpec, tp: int) -> np.ndarray:
    h, kv, d = spec.n_heads, spec.kv_heads, spec.head_dim
    hl = h // tp
    rows = []
    for s in range(tp):
        kv_heads = range(s * kv // tp, (s + 1) * kv // tp) if kv % tp == 0 else [s // (tp // kv)]
        q = [np.arange(i * d, (i + 1) * d) for i in range(s * hl, (s + 1) * hl)]
        k = [h * d + np.arange(i * d, (i + 1) * d) for i in kv_heads]
        v = [(h + kv) * d + np.arange(i * d, (i + 1) * d) for i in kv_heads]
        rows += q + k + v
    return np.concatenate(rows)


def _gate_up_rows(spec: ModelSpec, tp: int) -> np.ndarray:
    i = spec.intermediate_size
    il = i // tp
    return np.concatenate([np.r_[s * il : (s + 1) * il, i + s * il : i + (s + 1) * il] for s in range(tp)])


def relayout(params: dict, spec: ModelSpec, tp: int) -> dict:
    """Host-side re-layout of a numpy parameter tree for `tp` shards (identity for tp=1)."""
    if tp == 1:
        return params
    qkv = _qkv_rows(spec, tp)
    gate_up = _gate_up_rows(spec, tp) if spec.gated_mlp else None
    for layer in params["layers"]:
        for name, rows in ((names.QKV, qkv), (names.UP, gate_up)):
            if rows is None:
                continue
            for kind, arr in layer[name].items():  # weight [out, in] and bias [out]: rows are outputs
                layer[name][kind] = np.take(arr, rows, axis=0)
    vp = padded_vocab(spec, tp)
    for name in (names.EMBED, names.LM_HEAD):
        for kind, arr in params.get(name, {}).items():
            if arr.shape[0] == spec.vocab_size and vp != spec.vocab_size:
                pad = np.zeros((vp - arr.shape[0], *arr.shape[1:]), arr.dtype)
                params[name][kind] = np.concatenate([arr, pad])
    return params


def partition_spec(name: str, ndim: int):
    """The PartitionSpec of one parameter leaf from its dotted name (see `nx.names.ROLES`)."""
    from jax.sharding import PartitionSpec as P

    r = role(name)
    if r in ("column", "vocab"):  # [out, in] weights, [out] biases and scales: split the outputs
        return P(AXIS, *([None] * (ndim - 1)))
    if r == "row" and ndim >= 2:  # [out, in] (or the panel layout's [out / 16, in / 32, 256]): split the inputs
        return P(None, AXIS, *([None] * (ndim - 2)))
    return P()


def tree_names(tree: Any) -> Any:
    """A tree of the same structure whose leaves are dotted names like ``layers.3.qkv.w``."""
    import jax

    def name(path, _leaf):
        parts = []
        for k in path:
            parts.append(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))))
        return ".".join(parts)

    return jax.tree_util.tree_map_with_path(name, tree)
