"""`Family`: what a plugin registers, plus the declarative weight recipes families use.

Kept free of jax and torch so that plugin discovery and ``nx list-models`` stay fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from nx.spec import ModelSpec

Array = np.ndarray


@dataclass(frozen=True)
class Weight:
    """How to build one nx parameter from checkpoint tensors.

    `keys` are checkpoint tensor names; `build` receives their arrays in that order and returns the
    nx array; `shape` is what the result must be (checked, so a wrong config fails clearly).
    """

    keys: tuple[str, ...]
    build: Callable[..., Array]
    shape: tuple[int, ...]


def _transpose(a: Array) -> Array:
    return np.ascontiguousarray(a.T)


def _identity(a: Array) -> Array:
    return a


def tensor(key: str, shape: tuple[int, ...]) -> Weight:
    """A tensor used as stored (norm weights, biases, embedding tables)."""
    return Weight((key,), _identity, shape)


def _stored(shape: tuple[int, int]) -> tuple[int, int]:
    """The stored ``[out, in]`` shape of a linear weight given as ``(in, out)``."""
    return shape[1], shape[0]


def fused_vector(keys: tuple[str, ...], shape: tuple[int, ...]) -> Weight:
    """Biases of fused linears, concatenated in the same order."""
    return Weight(tuple(keys), lambda *bs: np.concatenate(bs), shape)


def split_heads_qkv(n_heads: int, head_dim: int, layout: str = "hqd") -> Callable[[Array], Array]:
    """Turn a per-head interleaved fused ``query_key_value`` into nx's ``[q | k | v]`` order.

    BLOOM and GPT-NeoX store the fused output rows as ``[heads, 3, head_dim]`` ("hqd"); the
    returned function reorders the leading (output) axis of a weight ``[out, ...]`` or bias ``[out]``.
    """
    if layout != "hqd":
        raise ValueError(f"unknown fused qkv layout {layout!r}")

    def reorder(a: Array) -> Array:
        rest = a.shape[1:]
        a = a.reshape(n_heads, 3, head_dim, *rest)
        return np.concatenate([a[:, j].reshape(n_heads * head_dim, *rest) for j in range(3)])

    return reorder


WeightMap = Mapping[str, Weight]


def norm(src: str, dst: str, size: int, bias: bool = True) -> dict[str, Weight]:
    """A norm's ``src.weight`` (and ``src.bias``) as nx's ``dst.w`` (and ``dst.b``)."""
    out = {f"{dst}.w": tensor(f"{src}.weight", (size,))}
    if bias:
        out[f"{dst}.b"] = tensor(f"{src}.bias", (size,))
    return out


def dense(src: str, dst: str, shape: tuple[int, int], bias: bool = True, conv1d: bool = False) -> dict[str, Weight]:
    """A torch ``nn.Linear`` named `src` mapping ``shape = (in, out)`` as nx's ``dst.w``, stored
    ``[out, in]`` like torch does (a GPT-2 ``Conv1D``, stored ``[in, out]``, is transposed), plus
    ``dst.b`` if it has a bias."""
    out = {f"{dst}.w": Weight((f"{src}.weight",), _transpose if conv1d else _identity, _stored(shape))}
    if bias:
        out[f"{dst}.b"] = tensor(f"{src}.bias", shape[1:])
    return out


def fused_dense(srcs: tuple[str, ...], dst: str, shape: tuple[int, int], bias: bool = True) -> dict[str, Weight]:
    """Several ``nn.Linear`` (q, k, v or gate, up) fused into nx's ``dst.w`` of ``shape = (in,
    sum(out))``, stored ``[sum(out), in]``: their output rows stacked in order."""
    out = {f"{dst}.w": Weight(tuple(f"{s}.weight" for s in srcs), lambda *ws: np.concatenate(ws), _stored(shape))}
    if bias:
        out[f"{dst}.b"] = fused_vector(tuple(f"{s}.bias" for s in srcs), shape[1:])
    return out


def per_head_qkv(src: str, dst: str, n_heads: int, head_dim: int, hidden: int, bias: bool = True) -> dict[str, Weight]:
    """A fused ``query_key_value`` whose output rows are laid out ``[heads, 3, head_dim]`` (BLOOM,
    GPT-NeoX) as nx's ``[q | k | v]`` ``dst.w`` ``[3 * heads * head_dim, hidden]`` (+ ``dst.b``)."""
    reorder = split_heads_qkv(n_heads, head_dim)
    width = 3 * n_heads * head_dim
    out = {f"{dst}.w": Weight((f"{src}.weight",), reorder, (width, hidden))}
    if bias:
        out[f"{dst}.b"] = Weight((f"{src}.bias",), reorder, (width,))
    return out


@dataclass(frozen=True)
class Family:
    """A model family registered by a plugin.

    - `spec_from_config` turns an HF ``PretrainedConfig`` into a `ModelSpec` (raise
      `nx.ConfigError` for unsupported options).
    - `weights` maps every nx parameter name (``embed.w``, ``layers.3.qkv.w`` ...) to a `Weight`.
    - `ignore` lists regexes of checkpoint keys that are known and deliberately unused (buffers,
      a duplicate tied lm head); any other unused key is reported as unexpected.
    - `base_prefix` is the HF ``base_model_prefix`` plus a dot (``"transformer."``, ``"model."``):
      checkpoints saved from the bare base model (as many hub originals are) lack it, and nx adds
      it back, like ``transformers`` does.
    - `from_gguf(gguf_name, hf_config)` gives the HF name of a llama.cpp tensor and a function
      fixing its layout (or None to drop it), for families that load GGUF files. The function must
      only reorder / select rows of a ``[rows, ...]`` array: nx applies it to a quantized tensor's
      values and per-row-group scales alike (`nx.quant.map_rows`).
    """

    name: str
    model_types: tuple[str, ...]
    spec_from_config: Callable[[Any], ModelSpec]
    weights: Callable[[ModelSpec], WeightMap]
    architectures: tuple[str, ...] = ()
    ignore: tuple[str, ...] = ()
    base_prefix: str = ""
    from_gguf: Callable[[str, Any], tuple[str, Callable[[Array], Array]] | None] | None = None
    description: str = ""
    plugin: str = field(default="", compare=False)
    distribution: str = field(default="", compare=False)
    version: str = field(default="", compare=False)

    def with_origin(self, plugin: str, distribution: str, version: str) -> Family:
        return replace(self, plugin=plugin, distribution=distribution, version=version)
