"""int8 / int4 weights inside the compiled programs: the `QuantizedWeight` pytree and its matmuls.

A quantized weight is ``q`` (int8 ``[out, in]`` for a linear weight, ``[vocab, hidden]`` for a
table) and ``scale``: one f32 per row (``w ~= q * scale[:, None]``), or with ``group_size`` one
per group of consecutive inputs of a row (``scale [out, in / group_size]``, optionally with an
affine ``zero`` of the same shape, GGUF's Q4_1 / Q4_K mins). Scales keep rows along the outputs,
so tensor-parallel sharding by role applies unchanged (row-parallel weights split their groups).
4-bit values are packed two per byte (uint8 ``[out, in / 2]``, llama.cpp's order within a group:
byte ``j`` holds value ``j`` low and ``j + group_size / 2`` high; ``v = n - 8`` symmetric, ``n``
affine) because XLA:CPU keeps ``jnp.int4`` at a byte per value and rejects int4 dots.

Matmuls, chosen per weight at load time (`int8_dot`, static aux data):

- **int8 dot** (the CPU backend): per-row weights split the activations into two int8 terms per
  row (``x ~= hi * s_hi + lo * s_lo``, ~15 bits), one int8 x int8 -> int32 dot; grouped weights
  round them to ONE int8 term per block of 32 inputs (`block_terms`, llama.cpp's q8_0
  activations, ~8 bits of each block) and take exact int32 dots per block (`grouped_int8_dot`:
  ``y = sum_g scale_g * sum_{b in g} sx_b * dot_b``) for up to 32 token rows, and dequantize for
  longer prompts. Why one term a block: half the dot work of two terms, as precise per block as
  the 4-bit weight it meets needs (BENCHMARKS.md, "Grouped kernel: one activation term per block");
- **dequantize** (accelerators): ``q`` converted to `dequant_dtype` inside the dot, which XLA fuses.

**Panel layout** (`QuantizedWeight.panel`: 4-bit and int8 weights with groups of 32, on the cpu
backend where nx-kernels-cpu runs; set at load by `nx.quant.panel_layout`): the same bytes and
scales in panels of `PANEL` (16) weight rows, transposed once. ``q`` is ``[out / 16, in / 32,
64 * bits]`` (byte ``64 d + 4 r + t`` of ``[p, b]`` is byte ``4 d + t`` of block ``b`` of row
``16 p + r``), ``scale`` / ``zero`` ``[out / 16, in / 32, 16]`` (``[p, b, r]``: row ``16 p + r``'s
of block ``b``). Why: the kernel's panels then read one sequential stream with no transposes
(one-row 4-bit calls 1.2-1.3x faster from memory, int8 ones up to 2.5x; BENCHMARKS.md, "Issue
#22's targets on this CPU, fifth round"). XLA's paths read it back as rows
(`QuantizedWeight.rows`). Axis 0 stays the outputs and axis 1 the inputs' blocks, so tensor
parallelism shards it by role as the rows layout.

On CPU the same int8 dots run as one custom call when the optional nx-kernels-cpu package is
installed (`nx.ops.cpu_kernels`, ``NX_CPU_KERNELS=off`` switches it off): per-row weights up to 2048
token rows, prompts included, with results equal to the XLA formulation's; grouped ones (``group_size`` a multiple
of 32; 4-bit read packed, once) up to 256 token rows, prompts included, equal to f32 rounding of
the sums over blocks and groups.

Why (measured): BENCHMARKS.md, "int8 weights on the CPU" and "Design measurements behind nx.ops".
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from nx.ops import cpu_kernels

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}
#: Inputs per int8 activation term of grouped weights (`block_terms`).
BLOCK = 32
#: Weight rows of a panel in the panel layout (`QuantizedWeight.panel`).
PANEL = 16


class QuantizedWeight:
    """``q`` int8 ``[out, in]`` (a linear weight or a ``[vocab, hidden]`` table) and its ``scale``.

    A jax pytree with leaves ``q``, ``scale`` and, for affine groups, ``zero`` (their dotted names
    end in ``.q`` / ``.scale`` / ``.zero``; ``zero`` None is no leaf) and the static fields:
    `dequant_dtype` (``"f32"``, ``"bf16"`` or ``"f16"``), `dtype` (the model's activation dtype,
    its ``amp``: rows looked up from a table come out in it), `int8_dot` (matmuls as int8 dots on
    int8 activation terms, set for the cpu backend, instead of converting ``q`` to `dequant_dtype`
    on accelerators), `bits` (8: ``q`` int8 ``[out, in]``; 4: ``q`` packed uint8 ``[out, in / 2]``)
    and `group_size` (None: one f32 scale per row, ``scale [out]``; else ``scale`` and ``zero``
    ``[out, in / group_size]``, f32 or f16 (GGUF's own f16 block scales), see the module docstring),
    and `panel` (the panel layout, groups of 32 only: ``q [out / 16, in / 32, 64 * bits]``,
    ``scale`` and ``zero`` ``[out / 16, in / 32, 16]``; see the module docstring). Leading axes
    (scanned layers) come before these.
    """

    __slots__ = ("q", "scale", "zero", "dequant_dtype", "dtype", "int8_dot", "bits", "group_size", "panel")

    def __init__(
        self,
        q: Any,
        scale: Any,
        dequant_dtype: str = "f32",
        dtype: str | None = None,
        int8_dot: bool = True,
        *,
        zero: Any = None,
        bits: int = 8,
        group_size: int | None = None,
        panel: bool = False,
    ) -> None:
        self.q = q
        self.scale = scale
        self.zero = zero
        self.dequant_dtype = dequant_dtype
        self.dtype = dtype or dequant_dtype
        self.int8_dot = int8_dot
        self.bits = bits
        self.group_size = group_size
        self.panel = panel

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's logical shape ``[out, in]`` (a 4-bit ``q`` holds half as many bytes)."""
        if self.panel:
            *lead, panels, blocks, _ = self.q.shape
            return (*lead, panels * PANEL, blocks * BLOCK)
        *lead, n = self.q.shape
        return (*lead, n * 8 // self.bits)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def compute_dtype(self):
        return DTYPES[self.dequant_dtype]

    def rows(self) -> QuantizedWeight:
        """This weight in the rows layout (itself unless `panel`): what XLA's paths read."""
        if not self.panel:
            return self
        return self._relaid(lambda a, bits=None: from_panels(a, bits), panel=False)

    def panels(self, empty: Any = None) -> QuantizedWeight:
        """This rows-layout weight in the panel layout (`to_panels`; `empty` allocates numpy results)."""
        return self._relaid(lambda a, bits=None: to_panels(a, bits, empty), panel=True)

    def _relaid(self, fn: Any, panel: bool) -> QuantizedWeight:
        """This weight with ``fn(q, bits)``, ``fn(scale)``, ``fn(zero)`` in the layout `panel`."""
        return QuantizedWeight(fn(self.q, self.bits), fn(self.scale), self.dequant_dtype, self.dtype, self.int8_dot,
                               zero=None if self.zero is None else fn(self.zero), bits=self.bits,
                               group_size=self.group_size, panel=panel)

    def values(self) -> jnp.ndarray:
        """The integer values ``v`` as int8 ``[out, in]`` (4-bit nibbles unpacked)."""
        w = self.rows()
        return unpack(w.q, w.bits, w.group_size, w.zero is None)

    def dequantize(self) -> jnp.ndarray:
        """The full-precision weight ``v * scale (+ zero)`` (in `dequant_dtype`)."""
        w = self.rows()
        return _dequantize(w.values(), w.scale, w.zero, w.group_size).astype(self.compute_dtype)

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight(q={self.q!r}, scale={self.scale!r}, zero={self.zero!r}, bits={self.bits}, "
            f"group_size={self.group_size}, panel={self.panel}, dequant_dtype={self.dequant_dtype!r}, "
            f"dtype={self.dtype!r}, int8_dot={self.int8_dot})"
        )


def _aux(w: QuantizedWeight) -> tuple:
    return (w.dequant_dtype, w.dtype, w.int8_dot, w.bits, w.group_size, w.panel)


def _flatten_with_keys(w: QuantizedWeight):
    keys = (jax.tree_util.GetAttrKey("q"), jax.tree_util.GetAttrKey("scale"), jax.tree_util.GetAttrKey("zero"))
    return tuple(zip(keys, (w.q, w.scale, w.zero))), _aux(w)


def _flatten(w: QuantizedWeight):
    return (w.q, w.scale, w.zero), _aux(w)


def _unflatten(aux, children) -> QuantizedWeight:
    dequant_dtype, dtype, int8_dot, bits, group_size, panel = aux
    q, scale, zero = children
    return QuantizedWeight(q, scale, dequant_dtype, dtype, int8_dot, zero=zero, bits=bits, group_size=group_size,
                           panel=panel)


jax.tree_util.register_pytree_with_keys(QuantizedWeight, _flatten_with_keys, _unflatten, _flatten)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def panel_ready(w: QuantizedWeight, shards: int = 1) -> bool:
    """Whether `w` can take the panel layout split over `shards` output shards: groups of 32, rows
    layout, and each shard's outputs a whole number of panels."""
    return (not w.panel and w.group_size == BLOCK and len(w.q.shape) == 2
            and w.shape[0] % (PANEL * shards) == 0)


def to_panels(a: Any, bits: int | None = None, empty: Any = None) -> Any:
    """The panel layout of a rows-layout ``q`` with `bits` (int8 ``[..., out, in]``, packed 4-bit
    ``[..., out, in / 2]``) or, with `bits` None, of ``[..., out, in / 32]`` scales / offsets
    (numpy or jax arrays; see the module docstring). For numpy, ``empty(shape, dtype)`` (default
    `numpy.empty`) allocates the result, which is written once; with `empty`, `a` is taken to the
    host first (the load-time conversion)."""
    if empty is not None:
        a = np.asarray(a)
    *lead, n, c = a.shape
    if bits is None:
        shape, t = (*lead, n // PANEL, c, PANEL), _moveaxis(a.reshape(*lead, n // PANEL, PANEL, c), -2, -1)
    else:
        row = BLOCK * bits // 8  # a block's bytes in a row
        t = _moveaxis(a.reshape(*lead, n // PANEL, PANEL, c // row, row // 4, 4), -4, -2)
        shape = (*lead, n // PANEL, c // row, PANEL * row)
    if not isinstance(a, np.ndarray):
        return t.reshape(shape)
    out = (empty or np.empty)(shape, a.dtype)
    np.copyto(out.reshape(t.shape), t)
    return out


def from_panels(a: Any, bits: int | None = None) -> Any:
    """The rows layout of a panel-layout ``q`` (`bits` 8 or 4) or scales / offsets (None):
    `to_panels`' inverse."""
    *lead, panels, blocks, c = a.shape
    if bits is None:
        return _moveaxis(a, -1, -2).reshape(*lead, panels * PANEL, blocks)
    row = c // PANEL
    t = _moveaxis(a.reshape(*lead, panels, blocks, row // 4, PANEL, 4), -2, -4)
    return t.reshape(*lead, panels * PANEL, blocks * row)


def _moveaxis(a: Any, src: int, dst: int) -> Any:
    """`a` with axis `src` moved to `dst` (a view in numpy, lazy in jax)."""
    return np.moveaxis(a, src, dst) if isinstance(a, np.ndarray) else jnp.moveaxis(a, src, dst)


def unpack(q: jnp.ndarray, bits: int, group_size: int | None, signed: bool = True) -> jnp.ndarray:
    """int8 values ``[..., in]`` of `q`: int8 as is; packed 4-bit ``[..., in / 2]`` unpacked in its
    groups (low nibbles first, then high ones), ``n - 8`` if `signed` (symmetric) else ``n``."""
    if bits == 8:
        return q
    *lead, half = q.shape
    g = q.reshape(*lead, half // (group_size // 2), group_size // 2)
    v = jnp.concatenate([g & 0xF, g >> 4], axis=-1).astype(jnp.int8)
    if signed:
        v = v - jnp.int8(8)
    return v.reshape(*lead, 2 * half)


def _grouped(a: jnp.ndarray, group_size: int) -> jnp.ndarray:
    """``[..., in]`` -> ``[..., in / group_size, group_size]``."""
    return a.reshape(*a.shape[:-1], a.shape[-1] // group_size, group_size)


def _dequantize(v: jnp.ndarray, scale: jnp.ndarray, zero: Any, group_size: int | None) -> jnp.ndarray:
    """f32 ``v * scale (+ zero)`` for values ``[..., in]`` and per-row or per-group scales."""
    if group_size is None:
        return v.astype(jnp.float32) * scale[..., None]
    w = _grouped(v, group_size).astype(jnp.float32) * scale[..., None].astype(jnp.float32)
    if zero is not None:
        w = w + zero[..., None].astype(jnp.float32)
    return w.reshape(v.shape)


def matmul(x: jnp.ndarray, w: QuantizedWeight) -> jnp.ndarray:
    """f32 ``x @ W.T`` for a quantized ``[out, in]`` weight or ``[vocab, hidden]`` table ``W``.

    Per-row scales: ``(x @ v.T) * scale`` (the scales applied once to the products), through
    `nx.ops.cpu_kernels` where it applies. Groups: see `_grouped_matmul`."""
    n, k = w.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    if w.group_size is not None:
        return _grouped_matmul(x2, w).reshape(*lead, n)
    dims = (((1,), (1,)), ((), ()))
    y = cpu_kernels.s8_matmul(x2, w)  # the same int8 dots in one custom call where it applies
    if y is not None:
        return y.reshape(*lead, n)
    if w.int8_dot:
        terms, scales = int8_terms(x2)
        acc = lax.dot_general(terms, w.values(), dims, preferred_element_type=jnp.int32)
        acc = acc.astype(jnp.float32) * scales
        m = x2.shape[0]
        y = acc[:m] + acc[m:]
    else:
        dt = w.compute_dtype
        y = lax.dot_general(x2.astype(dt), w.values().astype(dt), dims, preferred_element_type=jnp.float32)
    return (y * w.scale).reshape(*lead, n)


def _grouped_matmul(x: jnp.ndarray, w: QuantizedWeight) -> jnp.ndarray:
    """``x [m, in] @ W.T`` for grouped scales, f32 ``[m, out]``.

    - CPU (`int8_dot`) and ``m <= 32``: `grouped_int8_dot`, one int8 activation term per block of
      32 inputs against the int8 values in one int8 dot batched over the blocks (int32
      ``[blocks, m, out]``), weighted by the block scales, summed per group, weighted by the group
      scales; the weight is read once, as int8 (4-bit unpacked in the fusion that feeds the dot).
    - otherwise: the weight dequantized in the program (`dequant_dtype`, f32 on CPU) and one dot;
      with many rows its cost is shared, and the int32 partial sums would be larger than it.
    - affine groups add ``sum_g zero[:, g] * sum(x[:, group g])``, a small ``[m, groups]`` dot.

    On CPU up to 256 rows (1024 for 4-bit groups of 32) run the first formulation as one custom
    call (`nx.ops.cpu_kernels`) where it applies: XLA:CPU unpacks a 4-bit weight to int8 in memory
    and runs the batched dot slowly, and up to there prompts' dequantized dot costs more than the
    kernel's int8 dots.
    """
    y = cpu_kernels.grouped_matmul(x, w)
    if y is not None:
        return y
    w = w.rows()
    m, k = x.shape
    gs = w.group_size
    if w.int8_dot and m <= BLOCK:
        y = grouped_int8_dot(x, w)
    else:
        dt = jnp.float32 if w.int8_dot else w.compute_dtype
        weight = _dequantize(w.values(), w.scale, None, gs).astype(dt)
        y = lax.dot_general(x.astype(dt), weight, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    if w.zero is not None:
        sums = jnp.sum(_grouped(x.astype(jnp.float32), gs), axis=-1)  # [m, groups]
        y = y + lax.dot_general(sums, w.zero.astype(jnp.float32), (((1,), (1,)), ((), ())))
    return y


def grouped_int8_dot(x: jnp.ndarray, w: QuantizedWeight) -> jnp.ndarray:
    """f32 ``[m, out]``: ``sum_g scale[:, g] * sum_{b in g} sx[:, b] * dot_b`` (no affine term), the
    int32 dots ``dot_b`` of `block_terms` with the weight's values, block by block (one int8 dot
    batched over the ``in / 32`` blocks, int32 ``[blocks, m, out]``); blocks of ``group_size`` where
    32 does not divide it (GGUF Q6_K's 16). The math the nx-kernels-cpu grouped kernel runs (the
    same int32 dots)."""
    gs = w.group_size
    block = BLOCK if gs % BLOCK == 0 else gs
    terms, sx = block_terms(x, block)  # [m, blocks, block], [m, blocks]
    acc = lax.dot_general(
        terms, _grouped(w.values(), block), (((2,), (2,)), ((1,), (1,))), preferred_element_type=jnp.int32
    )  # [blocks, m, out]
    acc = acc.astype(jnp.float32) * sx.T[:, :, None]
    per_group = jnp.sum(acc.reshape(-1, gs // block, *acc.shape[1:]), axis=1)  # [groups, m, out]
    return jnp.sum(per_group * w.scale.T[:, None, :].astype(jnp.float32), axis=0)


def _round_rows(v: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The symmetric int8 rounding of `v` along its last axis: ``round(v / s)`` (half to even) and
    ``s = max|v| / 127`` (1 for an all-zero row: padding stays zero), ``s`` with a kept last axis."""
    scale = jnp.max(jnp.abs(v), axis=-1, keepdims=True) / 127.0
    scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.round(v / scale), scale


def block_terms(x: jnp.ndarray, block: int = BLOCK) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Rows ``x [m, k]`` (``k`` a multiple of `block`) as one int8 term per block of inputs, llama.cpp's
    q8_0 activations: int8 ``[m, k / block, block]`` and f32 scales ``[m, k / block]``, ``x ~= a * s``."""
    a, s = _round_rows(_grouped(x.astype(jnp.float32), block))
    return a.astype(jnp.int8), s[..., 0]


def int8_terms(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Rows ``x [m, k]`` as int8 ``[2m, k]`` and f32 scales ``[2m, 1]``: ``x ~= hi * s_hi + lo * s_lo``
    with ``hi`` (rows ``:m``) the symmetric per-row int8 rounding of ``x`` and ``lo`` (rows ``m:``)
    that of the remainder, so each row keeps ~15 bits relative to its largest element."""
    x = x.astype(jnp.float32)
    hi, s_hi = _round_rows(x)
    lo, s_lo = _round_rows(x - hi * s_hi)
    return jnp.concatenate([hi, lo]).astype(jnp.int8), jnp.concatenate([s_hi, s_lo])


def take_rows(w: QuantizedWeight, ids: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """Rows `ids` of a quantized ``[vocab, hidden]`` table, dequantized to `dtype` (a panel-layout
    table gathers the ids' panels, then each id's row within its panel)."""

    def rows(a, bytes_=False):
        if a is None:
            return None
        if not w.panel:
            return jnp.take(a, ids, axis=0)
        p = jnp.take(a, ids // PANEL, axis=0)  # [..., blocks, 16 * block bytes] or [..., blocks, 16]
        r = (ids % PANEL)[..., None, None]
        if bytes_:  # [..., blocks, block bytes / 4, 16, 4] -> row r's [..., blocks, block bytes / 4, 4]
            p = p.reshape(*p.shape[:-1], -1, PANEL, 4)
            got = jnp.take_along_axis(p, r[..., None, None], axis=-2)[..., 0, :]
            return got.reshape(*ids.shape, -1)
        return jnp.take_along_axis(p, r, axis=-1)[..., 0]

    v = unpack(rows(w.q, True), w.bits, w.group_size, w.zero is None)
    return _dequantize(v, rows(w.scale), rows(w.zero), w.group_size).astype(dtype)
