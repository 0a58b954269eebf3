"""int8 weight storage: `QuantizationConfig` and the host-side (numpy) quantizer run at load time.

Every 2-D floating parameter (linear weights ``[out, in]``, embedding / lm-head / position tables
``[rows, hidden]``) becomes a `nx.ops.quant.QuantizedWeight`: symmetric per-output-channel int8
``q = round(w / scale)`` with ``scale = max|w| / 127`` per output channel (f32), i.e. per row:
the output channel of a linear weight, one token or position of a table. Norm weights and
biases (1-D) always stay in floating point. The int8 weights are multiplied inside the compiled
program (`nx.ops.linear`, `nx.ops.lm_head`, `nx.ops.embed`; on CPU as int8 dots, see
`nx.ops.quant`), so every family gets int8 for free.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nx.errors import ConfigError

#: Default `no_quantize`: nothing beyond norms and biases (which are never quantized). The tied
#: embedding / lm head is the largest matrix of small models (21% of SmolLM2-135M's weights) and
#: per-row int8 keeps it accurate (>= 95% teacher-forced top-1 agreement with f32 on SmolLM2 with
#: everything quantized, see tests/test_quant.py); leaving it in f32 would keep > 40% of the f32
#: bytes. Exclude ``"embed.w"`` / ``"lm_head.w"`` here if a model's logits prove sensitive.
DEFAULT_NO_QUANTIZE: tuple[str, ...] = ()

QUANT_DTYPES = ("s8",)
DEQUANT_DTYPES = ("f32", "bf16", "f16")


@dataclass(frozen=True)
class QuantizationConfig:
    """How to store weights: ``QuantizationConfig(quant_dtype="s8", dequant_dtype="bf16")``.

    - `quant_dtype`: storage type; ``"s8"`` (symmetric int8, per-output-channel f32 scales).
    - `dequant_dtype`: dtype the int8 weights are converted to inside the program for the matmul
      (``"f32"``, ``"bf16"``, ``"f16"``) on accelerators; None follows the model's `amp`. The CPU
      backend never converts them: its matmuls are int8 dots on ~15-bit activation terms.
    - `no_quantize`: nx parameter-name patterns (fnmatch) left in floating point, matched against
      the full name (``layers.3.qkv.w``) and the name within a layer (``qkv.w``), e.g.
      ``("embed.w", "lm_head.w")`` or ``("layers.0.*",)``. Norms and biases are never quantized.
    """

    quant_dtype: str = "s8"
    dequant_dtype: str | None = None
    no_quantize: tuple[str, ...] = DEFAULT_NO_QUANTIZE

    def __post_init__(self) -> None:
        if self.quant_dtype not in QUANT_DTYPES:
            raise ConfigError(f"quant_dtype must be one of {list(QUANT_DTYPES)}, got {self.quant_dtype!r}")
        if self.dequant_dtype is not None and self.dequant_dtype not in DEQUANT_DTYPES:
            raise ConfigError(f"dequant_dtype must be one of {list(DEQUANT_DTYPES)} or None, got {self.dequant_dtype!r}")
        patterns = self.no_quantize
        if isinstance(patterns, str):
            patterns = (patterns,)
        if not all(isinstance(p, str) for p in patterns):
            raise ConfigError(f"no_quantize must be a sequence of parameter-name patterns, got {self.no_quantize!r}")
        object.__setattr__(self, "no_quantize", tuple(patterns))

    def skips(self, name: str) -> bool:
        """Whether parameter `name` (e.g. ``layers.3.qkv.w``) stays in floating point."""
        parts = name.split(".")
        local = ".".join(parts[2:]) if parts[0] == "layers" and len(parts) > 2 else name
        return any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(local, p) for p in self.no_quantize)

    def to_dict(self) -> dict:
        return {"quant_dtype": self.quant_dtype, "dequant_dtype": self.dequant_dtype, "no_quantize": list(self.no_quantize)}

    @classmethod
    def from_dict(cls, d: dict) -> QuantizationConfig:
        return cls(d["quant_dtype"], d.get("dequant_dtype"), tuple(d.get("no_quantize", ())))


def as_config(quant: QuantizationConfig | str | None) -> QuantizationConfig | None:
    """Accept a config, ``"s8"`` (defaults otherwise) or None."""
    if quant is None or isinstance(quant, QuantizationConfig):
        return quant
    if isinstance(quant, str):
        return QuantizationConfig(quant_dtype=quant)
    raise ConfigError(f"quant must be an nx.QuantizationConfig, 's8' or None, got {quant!r}")


def quantize(w: np.ndarray, axis: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric int8 quantization of `w` with one f32 scale per index of `axis` (the output channel).

    Returns ``(q, scale)`` with ``q`` int8 of `w`'s shape and ``scale`` f32 of shape
    ``[w.shape[axis]]``; ``|w - q * scale| <= scale / 2`` elementwise (exact round to nearest).
    All-zero channels get scale 0 and q 0.
    """
    w = np.asarray(w, dtype=np.float32)
    axis = axis % w.ndim
    reduce = tuple(i for i in range(w.ndim) if i != axis)
    amax = np.abs(w).max(axis=reduce) if reduce else np.abs(w)
    scale = (amax / 127.0).astype(np.float32)
    safe = np.where(scale > 0, scale, 1.0).astype(np.float32)
    shape = [1] * w.ndim
    shape[axis] = -1
    q = np.clip(np.rint(w / safe.reshape(shape)), -127, 127).astype(np.int8)
    return q, scale


def dequantize(q: np.ndarray, scale: np.ndarray, axis: int = 0) -> np.ndarray:
    """Host-side inverse of `quantize` (f32)."""
    shape = [1] * q.ndim
    shape[axis % q.ndim] = -1
    return q.astype(np.float32) * scale.reshape(shape)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def quantize_params(params: dict, config: QuantizationConfig, amp: str = "f32", backend: str = "cpu") -> dict:
    """Replace every quantizable leaf of a numpy parameter tree (nested as `nx.params.nest` builds
    it) by a `QuantizedWeight`; returns a new tree (the input is not modified). `amp` is the
    model's activation dtype; on the ``cpu`` `backend` matmuls run as int8 dots (`nx.ops.quant`)."""
    from nx.ops.quant import QuantizedWeight

    dequant = config.dequant_dtype or amp

    def walk(node: Any, name: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, _join(name, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, _join(name, i)) for i, v in enumerate(node)]
        if (
            isinstance(node, np.ndarray)
            and node.ndim == 2
            and np.issubdtype(node.dtype, np.floating)
            and not config.skips(name)
        ):
            q, scale = quantize(node)
            return QuantizedWeight(q, scale, dequant, amp, backend == "cpu")
        return node

    return walk(params, "")


def quantized_names(params: Any) -> list[str]:
    """Dotted names of the quantized weights in a parameter tree."""
    from nx.ops.quant import QuantizedWeight

    out: list[str] = []

    def walk(node: Any, name: str) -> None:
        if isinstance(node, QuantizedWeight):
            out.append(name)
        elif isinstance(node, dict):
            for k, v in node.items():
                walk(v, _join(name, k))
        elif isinstance(node, (list, tuple)):
            for i, v in enumerate(node):
                walk(v, _join(name, i))

    walk(params, "")
    return out


def nbytes(params: Any) -> int:
    """Bytes of every array leaf of a parameter tree (device or host arrays)."""
    import jax

    return int(sum(int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize for leaf in jax.tree.leaves(params)))


def patterns(value: Sequence[str] | str | None) -> tuple[str, ...]:
    """A comma-separated CLI string or a sequence of patterns as a tuple."""
    if value is None:
        return DEFAULT_NO_QUANTIZE
    if isinstance(value, str):
        return tuple(p.strip() for p in value.split(",") if p.strip())
    return tuple(value)


def weight_bytes(weight_map: Any, config: QuantizationConfig, itemsize: int) -> int:
    """Bytes the weights of a family's weight map occupy once quantized (int8 + f32 scales for the
    quantized 2-D weights, `itemsize` per element for the rest); used by the memory fit check."""
    total = 0
    for name, w in weight_map.items():
        n = int(np.prod(w.shape))
        if len(w.shape) == 2 and not config.skips(name):
            total += n + 4 * w.shape[0]
        else:
            total += n * itemsize
    return total
