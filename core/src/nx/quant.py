"""int8 / int4 weight storage: `QuantizationConfig` and the host-side (numpy) quantizer run at load time.

Every 2-D floating parameter (linear weights ``[out, in]``, embedding / lm-head / position tables
``[rows, hidden]``) becomes a `nx.ops.quant.QuantizedWeight`: ``"s8"`` is symmetric
per-output-channel int8 ``q = round(w / scale)`` with ``scale = max|w| / 127`` per output channel
(f32), i.e. per row: the output channel of a linear weight, one token or position of a table;
with a `group_size`, one scale per `group_size` consecutive inputs of a row instead. ``"s4"`` is
symmetric 4-bit in groups (default 32) as llama.cpp's Q4_0: the value of largest magnitude maps
to -8. Weights read already quantized (GGUF blocks, `nx.gguf_quant`) travel as `QuantizedArray`
and keep their own layout. Norm weights and biases (1-D) always stay in floating point. The int8 weights are multiplied inside the compiled
program (`nx.ops.linear`, `nx.ops.lm_head`, `nx.ops.embed`; on CPU as int8 dots, see
`nx.ops.quant`), so every family gets int8 for free.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from nx import memory
from nx.errors import ConfigError
from nx.names import role

#: Default `no_quantize`: nothing beyond norms and biases (which are never quantized). The tied
#: embedding / lm head is the largest matrix of small models (21% of SmolLM2-135M's weights) and
#: per-row int8 keeps it accurate (>= 95% teacher-forced top-1 agreement with f32 on SmolLM2 with
#: everything quantized, see tests/test_quant.py); leaving it in f32 would keep > 40% of the f32
#: bytes. Exclude ``"embed.w"`` / ``"lm_head.w"`` here if a model's logits prove sensitive.
DEFAULT_NO_QUANTIZE: tuple[str, ...] = ()

QUANT_DTYPES = ("s8", "s4")
BITS = {"s8": 8, "s4": 4}
#: Group size of ``"s4"`` when none is given: llama.cpp's Q4_0 blocks.
DEFAULT_GROUP_SIZE = 32
#: Values of `quant` asking for no quantized weights (a GGUF file's blocks dequantized to f32).
NO_QUANT = ("f32", False)  # as_config maps them to None
DEQUANT_DTYPES = ("f32", "bf16", "f16")


@dataclass(frozen=True)
class QuantizationConfig:
    """How to store weights: ``QuantizationConfig(quant_dtype="s8", dequant_dtype="bf16")``.

    - `quant_dtype`: storage type; ``"s8"`` (symmetric int8, per-output-channel f32 scales) or
      ``"s4"`` (symmetric 4-bit, two per byte, one f16 scale per group of inputs, as llama.cpp's
      Q4_0; f32 where a scale falls outside f16's normal range).
    - `group_size`: inputs per scale along each row: None (``"s8"``'s default) is one scale per
      row, ``"s4"`` defaults to 32 (Q4_0's blocks). Every quantized weight's input size, and a
      row-parallel weight's per-shard input size, must be a multiple (`check_groups`).
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
    group_size: int | None = None

    def __post_init__(self) -> None:
        if self.quant_dtype not in QUANT_DTYPES:
            raise ConfigError(f"quant_dtype must be one of {list(QUANT_DTYPES)}, got {self.quant_dtype!r}")
        if self.group_size is None and self.quant_dtype == "s4":
            object.__setattr__(self, "group_size", DEFAULT_GROUP_SIZE)
        g = self.group_size
        if g is not None and (not isinstance(g, int) or isinstance(g, bool) or g < 2 or g % 2):
            raise ConfigError(f"group_size must be an even int >= 2 (e.g. 32, 64, 128) or None, got {g!r}")
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

    @property
    def bits(self) -> int:
        return BITS[self.quant_dtype]

    def to_dict(self) -> dict:
        return {"quant_dtype": self.quant_dtype, "dequant_dtype": self.dequant_dtype,
                "no_quantize": list(self.no_quantize), "group_size": self.group_size}

    @classmethod
    def from_dict(cls, d: dict) -> QuantizationConfig:
        return cls(d["quant_dtype"], d.get("dequant_dtype"), tuple(d.get("no_quantize", ())), d.get("group_size"))


def as_config(quant: QuantizationConfig | str | bool | None) -> QuantizationConfig | None:
    """Accept a config, ``"s8"`` / ``"s4"`` (defaults otherwise), or None / ``"f32"`` / False (none)."""
    if quant is None or isinstance(quant, QuantizationConfig):
        return quant
    if quant is False or quant == "f32":
        return None
    if isinstance(quant, str):
        return QuantizationConfig(quant_dtype=quant)
    raise ConfigError(f"quant must be an nx.QuantizationConfig, 's8', 's4', 'f32' or None, got {quant!r}")


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


def quantize_groups(w: np.ndarray, bits: int, group_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric quantization of ``w [rows, in]`` with one scale per `group_size` inputs of a row.

    As llama.cpp's Q8_0 / Q4_0: ``scale = m / -(2**(bits-1))`` with ``m`` the group's value of
    largest magnitude, stored as f16 (`_half_scales`), so ``m`` maps to -128 / -8 (exactly, up to
    the scale's f16 rounding) and the rest round to nearest (clipped to 127 / 7: within one step of
    the value, half a step unless clipped). Returns ``(q, scale)``: for 8 bits ``q`` int8
    ``[rows, in]``, for 4 bits packed uint8 ``[rows, in / 2]`` (`pack4`); ``scale``
    ``[rows, in / group_size]``. All-zero groups get scale 0 and value 0.
    """
    w = np.asarray(w, dtype=np.float32)
    rows, n = w.shape
    g = w.reshape(rows, n // group_size, group_size)
    idx = np.abs(g).argmax(axis=-1)[..., None]
    peak = np.take_along_axis(g, idx, axis=-1)[..., 0]
    lo = -(1 << (bits - 1))
    scale = _half_scales((peak / lo).astype(np.float32))
    safe = np.where(scale != 0, scale, 1.0).astype(np.float32)
    v = np.clip(np.rint(g / safe[..., None]), lo, -lo - 1).astype(np.int8).reshape(rows, n)
    return (v if bits == 8 else pack4(v, group_size)), scale


def _half_scales(scale: np.ndarray) -> np.ndarray:
    """Group scales as f16 when every nonzero one is a normal f16 (2**-14 ... 65504), else as f32.
    Why: the bytes a decode step streams (an f32 scale adds 1 bit per 4-bit weight, f16 half of
    that, as GGUF's Q4_0 / Q8_0 blocks), at a relative rounding of 2**-11, far below a 4- or 8-bit
    step; outside that range f16 would lose the scale (subnormals, overflow)."""
    a = np.abs(scale[scale != 0])
    if a.size and (a.min() < 2.0**-14 or a.max() > 65504.0):
        return scale
    return scale.astype(np.float16)


def pack4(v: np.ndarray, group_size: int, signed: bool = True) -> np.ndarray:
    """4-bit values ``v [rows, in]`` (-8..7 if `signed`, else 0..15) packed two per byte in each
    group, llama.cpp's order: byte ``j`` holds value ``j`` (low nibble) and ``j + group_size / 2``."""
    rows, n = v.shape
    n8 = (v.astype(np.int16) + (8 if signed else 0)).astype(np.uint8).reshape(rows, n // group_size, 2, group_size // 2)
    return (n8[:, :, 0] | (n8[:, :, 1] << 4)).reshape(rows, n // 2)


def unpack4(q: np.ndarray, group_size: int, signed: bool = True) -> np.ndarray:
    """Inverse of `pack4`: int8 ``[rows, in]``."""
    rows, half = q.shape
    g = q.reshape(rows, half // (group_size // 2), 1, group_size // 2)
    v = np.concatenate([g & 0xF, g >> 4], axis=2).astype(np.int8).reshape(rows, 2 * half)
    return v - np.int8(8) if signed else v


def dequantize_groups(
    q: np.ndarray, scale: np.ndarray, bits: int, group_size: int, zero: np.ndarray | None = None
) -> np.ndarray:
    """Host-side f32 ``v * scale (+ zero)`` of grouped values (4-bit ones packed, `pack4`)."""
    v = q if bits == 8 else unpack4(q, group_size, signed=zero is None)
    rows, n = v.shape
    w = v.reshape(rows, n // group_size, group_size).astype(np.float32) * scale[..., None]
    if zero is not None:
        w = w + zero[..., None]
    return w.reshape(rows, n)


#: Host buffers this aligned are placed on the CPU backend without a copy (jax 0.10: zero-copy
#: from 64-byte aligned numpy arrays; numpy's own are 16-byte aligned and copied).
ALIGN = 64


def aligned_empty(shape: Any, dtype: Any) -> np.ndarray:
    """An uninitialized array whose data starts on an `ALIGN`-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(n + ALIGN, np.uint8)
    start = -buf.ctypes.data % ALIGN
    return buf[start : start + n].view(dtype).reshape(shape)


def aligned(a: np.ndarray, base: Any = None) -> np.ndarray:
    """`a` itself if it is contiguous, `ALIGN`-aligned and shares no memory with `base`, else an
    aligned copy."""
    if a.flags.c_contiguous and a.ctypes.data % ALIGN == 0 and (base is None or not np.may_share_memory(a, base)):
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


class QuantizedArray:
    """A quantized 2-D tensor on the host while a model loads (read from a GGUF file in its own
    layout, see `nx.gguf_quant`): ``q``, ``scale``, optional ``zero`` as in
    `nx.ops.quant.QuantizedWeight`, all indexed by row.

    The weight recipes' row operations keep it quantized: ``np.concatenate`` along rows (fused
    q/k/v, gate/up; plain float pieces such as vocabulary padding are quantized to join them),
    ``np.take`` of rows (tensor-parallel re-layout) and `map_rows` (a family's GGUF layout fix,
    a function of row-indexed arrays, applied to values and scales alike). Any other numpy
    function sees the dequantized f32 array: correct, but no longer quantized.
    """

    dtype = np.dtype(np.float32)  # what it stands for: recipes building padding use it
    ndim = 2

    def __init__(self, q: np.ndarray, scale: np.ndarray, bits: int, group_size: int, zero: np.ndarray | None = None):
        self.q, self.scale, self.bits, self.group_size, self.zero = q, scale, bits, group_size, zero

    @property
    def shape(self) -> tuple[int, int]:
        return (self.q.shape[0], self.q.shape[1] * 8 // self.bits)

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in (self.q, self.scale, self.zero) if a is not None)

    def map_rows(self, fn: Any) -> QuantizedArray:
        """`fn` (a permutation / selection of rows of any ``[rows, ...]`` array) applied to each part.
        Every result of `map_rows`, ``np.concatenate`` and ``np.take`` is `aligned`, so the CPU
        backend takes it without a copy."""

        def f(a):
            return None if a is None else aligned(np.asarray(fn(a)))

        return QuantizedArray(f(self.q), f(self.scale), self.bits, self.group_size, f(self.zero))

    def dequantize(self) -> np.ndarray:
        return dequantize_groups(self.q, self.scale, self.bits, self.group_size, self.zero)

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        w = self.dequantize()
        return w if dtype is None else w.astype(dtype)

    def _like(self, a: Any) -> QuantizedArray:
        """`a` (this layout or plain floats, e.g. zero padding) in this layout."""
        if isinstance(a, QuantizedArray):
            if (a.bits, a.group_size, a.zero is None) != (self.bits, self.group_size, self.zero is None):
                a = QuantizedArray(*quantize_groups(a.dequantize(), self.bits, self.group_size), self.bits, self.group_size)
            else:
                return a
        else:
            a = QuantizedArray(*quantize_groups(np.asarray(a, np.float32), self.bits, self.group_size), self.bits, self.group_size)
        if self.zero is None:
            return a
        if a.bits == 8:  # symmetric -> affine: zero 0
            return QuantizedArray(a.q, a.scale, 8, a.group_size, np.zeros_like(a.scale))
        # 4-bit affine values are unsigned nibbles n = v + 8, so zero = -8 * scale (both in f32, where
        # -8 * a large f16 scale could overflow)
        n = pack4(unpack4(a.q, a.group_size) + 8, a.group_size, signed=False)
        scale = a.scale.astype(np.float32)
        return QuantizedArray(n, scale, 4, a.group_size, -8.0 * scale)

    def __array_function__(self, func, types, args, kwargs):
        if func is np.concatenate and kwargs.get("axis", 0) == 0 and len(args) == 1:
            parts = [self._like(a) for a in args[0]]

            def join(arrays):
                out = aligned_empty((sum(a.shape[0] for a in arrays), *arrays[0].shape[1:]), np.result_type(*arrays))
                return np.concatenate(arrays, out=out)

            zero = None if self.zero is None else join([p.zero for p in parts])
            return QuantizedArray(join([p.q for p in parts]), join([p.scale for p in parts]), self.bits, self.group_size, zero)
        if func is np.take and (kwargs.get("axis", args[2] if len(args) > 2 else None) == 0) and args[0] is self:
            return self.map_rows(lambda a: np.take(a, args[1], axis=0))

        def plain(a):
            if isinstance(a, QuantizedArray):
                return a.dequantize()
            if isinstance(a, (list, tuple)):
                return type(a)(plain(x) for x in a)
            return a

        return func(*plain(args), **{k: plain(v) for k, v in kwargs.items()})


def map_rows(fn: Any, a: Any) -> Any:
    """``fn(a)``, or for a `QuantizedArray` `fn` applied to its row-indexed parts (see there)."""
    return a.map_rows(fn) if isinstance(a, QuantizedArray) else fn(a)


def _join(prefix: str, key: Any) -> str:
    return f"{prefix}.{key}" if prefix else str(key)


def quantize_params(params: dict, config: QuantizationConfig, amp: str = "f32", backend: str = "cpu") -> dict:
    """Replace every quantizable leaf of a numpy parameter tree (nested as `nx.params.nest` builds
    it) by a `QuantizedWeight`; returns a new tree (the input is not modified). `amp` is the
    model's activation dtype; on the ``cpu`` `backend` matmuls run as int8 dots (`nx.ops.quant`).
    A `QuantizedArray` (read quantized from a GGUF file) keeps its own layout, or is dequantized
    if `config` leaves its name in floating point."""
    from nx.ops.quant import QuantizedWeight

    dequant = config.dequant_dtype or amp
    int8_dot = backend == "cpu"

    def walk(node: Any, name: str) -> Any:
        if isinstance(node, dict):
            return {k: walk(v, _join(name, k)) for k, v in node.items()}
        if isinstance(node, list):
            return [walk(v, _join(name, i)) for i, v in enumerate(node)]
        if isinstance(node, QuantizedArray):
            if config.skips(name):
                return node.dequantize()
            return QuantizedWeight(node.q, node.scale, dequant, amp, int8_dot, zero=node.zero, bits=node.bits,
                                   group_size=node.group_size)
        if (
            isinstance(node, np.ndarray)
            and node.ndim == 2
            and np.issubdtype(node.dtype, np.floating)
            and not config.skips(name)
        ):
            if config.group_size is None:
                return QuantizedWeight(*quantize(node), dequant, amp, int8_dot)
            q, scale = quantize_groups(node, config.bits, config.group_size)
            return QuantizedWeight(q, scale, dequant, amp, int8_dot, bits=config.bits, group_size=config.group_size)
        return node

    return walk(params, "")


def panel_layout(params: dict, tp: int = 1) -> dict:
    """The tree with every grouped weight (groups of 32) that the cpu kernels read put in the panel
    layout (`nx.ops.quant.to_panels`), where nx-kernels-cpu runs (`nx.ops.cpu_kernels.enabled`);
    column-parallel and vocabulary weights only where each of the `tp` shards holds whole panels.
    Why: the kernel's panels then read the weight as one stream, with no transposes at run time.
    The tree is modified in place: each weight's host copy is replaced as it is converted, and the
    freed heap goes back to the OS every `nx.memory.TRIM_BYTES`, so loading holds one model's
    weights plus one tensor, not two copies."""
    from nx.ops import cpu_kernels
    from nx.ops.quant import QuantizedWeight, panel_ready

    if not cpu_kernels.enabled():
        return params
    freed = 0

    def convert(w: QuantizedWeight, name: str) -> QuantizedWeight:
        nonlocal freed
        shards = tp if role(name) in ("column", "vocab") else 1
        if not (w.int8_dot and panel_ready(w, shards)):
            return w
        freed += sum(a.nbytes for a in (w.q, w.scale, w.zero) if a is not None)
        return w.panels(aligned_empty)  # aligned: placed without another copy

    def walk(node: Any, name: str) -> Any:
        nonlocal freed
        if isinstance(node, QuantizedWeight):
            return convert(node, name)
        keys = node.keys() if isinstance(node, dict) else range(len(node)) if isinstance(node, list) else ()
        for k in keys:
            node[k] = walk(node[k], _join(name, k))  # the old weight is released here
            if freed >= memory.TRIM_BYTES:
                memory.return_freed_memory()
                freed = 0
        return node

    walk(params, "")
    memory.return_freed_memory()
    return params


def check_groups(weight_map: Any, config: QuantizationConfig | None, tp: int = 1) -> None:
    """Fail before reading weights if `config`'s groups do not tile every quantized weight: each
    input size must be a multiple of the group size, and a row-parallel weight's per-shard input
    size too (its groups are split over the `tp` shards). The error names the group sizes and tp
    degrees that work."""

    if config is None or config.group_size is None:
        return
    # (input size, whether it is split over the shards) of every quantized weight
    dims = {(w.shape[1], role(name) == "row") for name, w in weight_map.items()
            if len(w.shape) == 2 and not config.skips(name)}

    def fits(g: int, t: int) -> bool:
        return all(n % (g * t if split else g) == 0 for n, split in dims)

    if fits(config.group_size, tp):
        return
    groups = [g for g in (16, 32, 64, 128, 256) if fits(g, tp)]
    tps = [t for t in range(1, tp + 1) if fits(config.group_size, t)]
    raise ConfigError(
        f"group_size={config.group_size} does not tile the inputs of every quantized weight "
        f"(input sizes {sorted({n for n, _ in dims})}"
        f"{f', row-parallel ones split over tp_degree={tp}' if tp > 1 else ''}). "
        f"Valid group sizes{f' at tp_degree={tp}' if tp > 1 else ''}: {groups or 'none of 16-256'}"
        f"{f'; tp degrees valid for group_size={config.group_size}: {tps}' if tp > 1 else ''}; "
        "or keep the odd weights in float with no_quantize"
    )


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
    """Bytes the weights of a family's weight map occupy once quantized (int8 / packed int4 + f32
    row scales or f16 group scales for the quantized 2-D weights, `itemsize` per element for the
    rest); used by the memory fit check."""
    total = 0
    for name, w in weight_map.items():
        n = int(np.prod(w.shape))
        if len(w.shape) == 2 and not config.skips(name):
            scales = w.shape[0] if config.group_size is None else n // config.group_size
            total += n * config.bits // 8 + (4 if config.group_size is None else 2) * scales
        else:
            total += n * itemsize
    return total
