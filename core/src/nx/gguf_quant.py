"""GGUF quantized tensors decoded straight into nx's grouped int8 / int4 layouts (no f32 copy).

Each supported llama.cpp block type maps onto `nx.quant.QuantizedArray` (values, per-group f32
scales, optional per-group offsets; rows are the tensor's outputs) with numpy operations over all
blocks at once. The values dequantize to exactly llama.cpp's (``gguf.quants`` is the reference in
tests/test_gguf_quant.py). Scales and offsets that are a block's own f16 fields (Q8_0, Q4_0, Q4_1)
stay f16, so the decoded weights take the file's bytes (the programs widen them to f32); the
K-quants' products of two scales are f32:

============ ============================================ ==========================================
type         block                                        nx layout
============ ============================================ ==========================================
Q8_0         f16 ``d``, 32 int8                           s8, group 32: ``v``, ``scale = d``
Q4_0         f16 ``d``, 32 nibbles ``n``: ``(n - 8) * d`` s4, group 32, bytes as stored
Q4_1         f16 ``d``, ``m``, 32 nibbles: ``n * d + m``  s4 affine, group 32: ``zero = m``
Q4_K         256: f16 ``d``, ``dmin``, 8 x 6-bit ``sc``,  s4 affine, group 32: ``scale = d * sc``,
             ``mn``, 256 nibbles                          ``zero = -(dmin * mn)``, nibbles repacked
Q6_K         256: 6-bit ``q - 32``, 16 int8 ``sc`` (one   s8, group 16: ``v = q - 32``,
             per 16), f16 ``d``                           ``scale = d * sc``
============ ============================================ ==========================================

Tensors of other types are read as f32 (`nx.checkpoint`'s reader) and follow the `quant` config.
"""

from __future__ import annotations

import collections
import logging
from pathlib import Path
from typing import Any

import numpy as np

from nx import memory
from nx.quant import QuantizationConfig, QuantizedArray, aligned

log = logging.getLogger("nx")

#: GGUF type name -> (bits, group size) of the nx layout it decodes to.
LAYOUTS: dict[str, tuple[int, int]] = {"Q8_0": (8, 32), "Q4_0": (4, 32), "Q4_1": (4, 32), "Q4_K": (4, 32), "Q6_K": (8, 16)}


def _f16(b: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """Little-endian f16 from the last axis' 2 bytes, as `dtype` ``[...]``."""
    return np.ascontiguousarray(b).view(np.float16)[..., 0].astype(dtype)


def _q8_0(blocks: np.ndarray) -> QuantizedArray:
    rows = blocks.shape[0]
    v = np.ascontiguousarray(blocks[..., 2:]).view(np.int8).reshape(rows, -1)
    return QuantizedArray(v, _f16(blocks[..., :2], np.float16), 8, 32)


def _q4_0(blocks: np.ndarray) -> QuantizedArray:
    rows = blocks.shape[0]
    return QuantizedArray(np.ascontiguousarray(blocks[..., 2:]).reshape(rows, -1), _f16(blocks[..., :2], np.float16), 4, 32)


def _q4_1(blocks: np.ndarray) -> QuantizedArray:
    rows = blocks.shape[0]
    q = np.ascontiguousarray(blocks[..., 4:]).reshape(rows, -1)
    return QuantizedArray(q, _f16(blocks[..., :2], np.float16), 4, 32, zero=_f16(blocks[..., 2:4], np.float16))


def k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 8 six-bit scales and mins from their 12 bytes ``[..., 12]`` (llama.cpp's
    ``get_scale_min_k4``): sub-blocks 0-3 in the low 6 bits of bytes 0-3 / 4-7, sub-blocks 4-7 in
    the nibbles of bytes 8-11 plus the top 2 bits of bytes 0-3 / 4-7."""
    a, b, c = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 2) & 0x30)], axis=-1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 2) & 0x30)], axis=-1)
    return sc, mn


def _q4_k(blocks: np.ndarray) -> QuantizedArray:
    rows, nb = blocks.shape[:2]
    d, dmin = _f16(blocks[..., 0:2])[..., None], _f16(blocks[..., 2:4])[..., None]
    sc, mn = k_scales(blocks[..., 4:16])
    scale = (d * sc.astype(np.float32)).reshape(rows, nb * 8)
    zero = -(dmin * mn.astype(np.float32)).reshape(rows, nb * 8)
    # 4 chunks of 32 bytes: low nibbles are sub-block 2j, high nibbles sub-block 2j + 1
    qs = blocks[..., 16:].reshape(rows, nb, 4, 1, 32)
    n = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(rows, nb * 8, 32)
    q = (n[..., :16] | (n[..., 16:] << 4)).reshape(rows, -1)  # nx's order within a group of 32
    return QuantizedArray(q, scale, 4, 32, zero=zero)


def _q6_k(blocks: np.ndarray) -> QuantizedArray:
    rows, nb = blocks.shape[:2]
    ql = blocks[..., :128].reshape(rows, nb, 2, 1, 64)
    qh = blocks[..., 128:192].reshape(rows, nb, 2, 1, 32)
    lo = (ql >> np.uint8([0, 4]).reshape(2, 1)) & 0x0F  # [rows, nb, 2, 2, 64] -> 8 x 32 values
    hi = (qh >> np.uint8([0, 2, 4, 6]).reshape(4, 1)) & 0x03  # [rows, nb, 2, 4, 32]
    v = ((lo.reshape(rows, nb, 8, 32) | (hi.reshape(rows, nb, 8, 32) << 4)).astype(np.int8) - np.int8(32))
    sc = np.ascontiguousarray(blocks[..., 192:208]).view(np.int8).astype(np.float32)
    scale = (_f16(blocks[..., 208:210])[..., None] * sc).reshape(rows, nb * 16)
    return QuantizedArray(v.reshape(rows, -1), scale, 8, 16)


DECODERS = {"Q8_0": _q8_0, "Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k, "Q6_K": _q6_k}


def decode(raw: np.ndarray, type_name: str, shape: tuple[int, int]) -> QuantizedArray:
    """The ``[rows, cols]`` tensor held in `raw` (its bytes, row after row) as a `QuantizedArray`."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[type_name]]
    rows, cols = shape
    return DECODERS[type_name](np.asarray(raw, np.uint8).reshape(rows, cols // block, size))


def dequantize(raw: np.ndarray, type_name: str) -> np.ndarray | None:
    """f32 values of the 32-value blocks of Q8_0, Q4_0 and Q4_1 data `raw` (flat, bytes as stored),
    equal to ``gguf.quants.dequantize``'s, in a few numpy passes over all blocks (~3x faster:
    loading dequantizes every weight); None for other types (the caller uses gguf's)."""
    fields = _FLAT_BLOCKS.get(type_name)
    if fields is None:
        return None
    blocks = np.asarray(raw, np.uint8).reshape(-1).view(np.dtype(fields))
    out = np.empty((len(blocks), 32), np.float32)
    if type_name == "Q8_0":
        out[:] = blocks["qs"].view(np.int8)
    else:
        np.bitwise_and(blocks["qs"], 0x0F, out=out[:, :16], casting="unsafe")
        np.right_shift(blocks["qs"], 4, out=out[:, 16:], casting="unsafe")
        if type_name == "Q4_0":
            out -= 8
    out *= blocks["d"].astype(np.float32)[:, None]
    if type_name == "Q4_1":
        out += blocks["m"].astype(np.float32)[:, None]
    return out.reshape(-1)


#: the 32-value block types `dequantize` reads, as numpy record layouts
_FLAT_BLOCKS = {
    "Q8_0": [("d", "<f2"), ("qs", "u1", 32)],
    "Q4_0": [("d", "<f2"), ("qs", "u1", 16)],
    "Q4_1": [("d", "<f2"), ("m", "<f2"), ("qs", "u1", 16)],
}


def config_for(type_name: str) -> QuantizationConfig:
    """The `quant` config matching a GGUF block type (float tensors of the file follow it)."""
    bits, group = LAYOUTS[type_name]
    return QuantizationConfig("s8" if bits == 8 else "s4", group_size=group)


class QuantizedTensors:
    """A GGUF file's tensors with supported quantized blocks decoded by `decode`, others through
    `fallback` (f32). Each read maps just that tensor's bytes and unmaps them once decoded, so the
    file's pages do not stay resident next to the decoded weights (they count in the process's
    resident memory as long as a mapping lives), trims the heap of the decoding's temporaries, and
    returns `aligned` arrays, which the CPU backend places without a copy."""

    def __init__(self, file: Path, tensors: list[Any], fallback: Any) -> None:
        self.file = file
        self.fallback = fallback
        self.where = {
            t.name: (int(t.data_offset), int(t.n_bytes), t.tensor_type.name, tuple(int(d) for d in reversed(t.shape)))
            for t in tensors
        }

    def counts(self) -> collections.Counter:
        """Bytes per supported block type among the 2-D tensors."""
        out: collections.Counter = collections.Counter()
        for _, n, kind, shape in self.where.values():
            if kind in LAYOUTS and len(shape) == 2:
                out[kind] += n
        return out

    def __call__(self, name: str) -> Any:
        offset, n, kind, shape = self.where[name]
        if kind not in LAYOUTS or len(shape) != 2:
            return self.fallback(name)
        raw = np.memmap(self.file, dtype=np.uint8, mode="r", offset=offset, shape=(n,))
        try:
            out = decode(raw, kind, shape).map_rows(lambda a: aligned(a, base=raw))  # own, aligned memory
        finally:
            raw._mmap.close()  # noqa: SLF001 (unmapped now: its pages leave the resident set)
        memory.return_freed_memory()  # the decoding's temporaries, so holes do not pile up in the heap
        return out


def keep_quantized(ckpt: Any) -> QuantizationConfig | None:
    """For a GGUF checkpoint holding supported quantized blocks: switch `ckpt.tensors` to read them
    in nx's layouts and return the `quant` config of the most common type (by bytes), logging
    what was chosen; None (and `ckpt` unchanged) otherwise."""
    source = getattr(ckpt, "gguf_quantized", None)
    if source is None:
        return None
    counts = source.counts()
    if not counts:
        return None
    kind = counts.most_common(1)[0][0]
    config = config_for(kind)
    ckpt.tensors = ckpt.gguf_quantized_tensors
    others = "".join(f", {k} as {config_for(k).quant_dtype} (group {config_for(k).group_size})" for k in counts if k != kind)
    log.info(
        "GGUF holds %s weights: loading them as %s (group %d)%s, without dequantizing (its float 2-D tensors "
        "as %s too); quant='f32' dequantizes them, quant='s8' / 's4' requantizes",
        kind, config.quant_dtype, config.group_size, others, config.quant_dtype,
    )
    return config
