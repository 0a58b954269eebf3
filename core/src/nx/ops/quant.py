"""int8 weights inside the compiled programs: the `QuantizedWeight` pytree and its matmuls.

A quantized weight is ``q`` (int8, the weight's own shape: ``[out, in]`` for a linear weight,
``[vocab, hidden]`` for an embedding / lm-head table) and ``scale`` (f32, one per output channel,
i.e. per row), with ``w ~= q * scale[:, None]``. Keeping ``scale`` 1-D along the rows means
tensor-parallel sharding by role applies unchanged: a column-parallel weight splits ``q``'s rows
and ``scale`` with them, a row-parallel weight splits ``q``'s columns and replicates ``scale``, a
vocabulary-parallel table splits both along vocab.

Two matmul formulations, chosen per weight at load time (`int8_dot`, static pytree aux data):

- **int8 dot** (the CPU backend): the weight stays int8 and the activations are split into two
  int8 terms per row, ``x ~= hi * s_hi + lo * s_lo`` (``lo`` quantizes what ``hi`` left over, so
  together they carry ~15 bits of each row, more than bf16's 8), and one int8 x int8 -> int32 dot
  multiplies both terms at once. On XLA:CPU that dot beats the f32 one (SmolLM2-135M's weight
  matmuls: 13 vs 22 ms per decode step, 25 vs 109 ms per 128-token prefill), while an int8 weight
  converted to f32 inside the program is materialized at every call (7 tokens/s). SmolLM2-135M on
  2 cores decodes at 61 tokens/s against 40 in f32 and encodes 128 tokens in 92 against 142 ms
  (BENCHMARKS.md). The two terms also fill the second row that keeps a one-token matmul off
  XLA:CPU's slow int8 matrix-vector path.
- **dequantize** (accelerators): ``(x @ q.T) * scale`` with ``q`` converted to `dequant_dtype`,
  a conversion XLA fuses into the dot there.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


class QuantizedWeight:
    """``q`` int8 ``[out, in]`` (a linear weight or a ``[vocab, hidden]`` table) and per-row ``scale``.

    A jax pytree with leaves ``q`` and ``scale`` (their dotted names end in ``.q`` / ``.scale``) and
    the static `dequant_dtype` (``"f32"``, ``"bf16"`` or ``"f16"``). `dtype` is the model's
    activation dtype (its ``amp``; rows looked up from a table come out in it) and `int8_dot`
    whether matmuls run as int8 dots on int8 activation terms (set for the cpu backend) instead of
    converting ``q`` to `dequant_dtype` (accelerators), both static too.
    """

    __slots__ = ("q", "scale", "dequant_dtype", "dtype", "int8_dot")

    def __init__(
        self,
        q: Any,
        scale: Any,
        dequant_dtype: str = "f32",
        dtype: str | None = None,
        int8_dot: bool = True,
    ) -> None:
        self.q = q
        self.scale = scale
        self.dequant_dtype = dequant_dtype
        self.dtype = dtype or dequant_dtype
        self.int8_dot = int8_dot

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.q.shape)

    @property
    def ndim(self) -> int:
        return len(self.q.shape)

    @property
    def compute_dtype(self):
        return DTYPES[self.dequant_dtype]

    def dequantize(self) -> jnp.ndarray:
        """The full-precision weight ``q * scale`` (in `dequant_dtype`)."""
        return (self.q.astype(jnp.float32) * self.scale[:, None]).astype(self.compute_dtype)

    def __repr__(self) -> str:
        return (
            f"QuantizedWeight(q={self.q!r}, scale={self.scale!r}, dequant_dtype={self.dequant_dtype!r}, "
            f"dtype={self.dtype!r}, int8_dot={self.int8_dot})"
        )


def _flatten_with_keys(w: QuantizedWeight):
    keys = (jax.tree_util.GetAttrKey("q"), jax.tree_util.GetAttrKey("scale"))
    return tuple(zip(keys, (w.q, w.scale))), (w.dequant_dtype, w.dtype, w.int8_dot)


def _flatten(w: QuantizedWeight):
    return (w.q, w.scale), (w.dequant_dtype, w.dtype, w.int8_dot)


def _unflatten(aux, children) -> QuantizedWeight:
    return QuantizedWeight(children[0], children[1], *aux)


jax.tree_util.register_pytree_with_keys(QuantizedWeight, _flatten_with_keys, _unflatten, _flatten)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


def matmul(x: jnp.ndarray, w: QuantizedWeight) -> jnp.ndarray:
    """f32 ``x @ (q * scale).T`` for an ``[out, in]`` weight or ``[vocab, hidden]`` table, computed
    as ``(x @ q.T) * scale`` (the per-row scales applied once to the products)."""
    n, k = w.q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    dims = (((1,), (1,)), ((), ()))
    if w.int8_dot:
        terms, scales = int8_terms(x2)
        acc = lax.dot_general(terms, w.q, dims, preferred_element_type=jnp.int32)
        acc = acc.astype(jnp.float32) * scales
        m = x2.shape[0]
        y = acc[:m] + acc[m:]
    else:
        dt = w.compute_dtype
        y = lax.dot_general(x2.astype(dt), w.q.astype(dt), dims, preferred_element_type=jnp.float32)
    return (y * w.scale).reshape(*lead, n)


def int8_terms(x: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Rows ``x [m, k]`` as int8 ``[2m, k]`` and f32 scales ``[2m, 1]``: ``x ~= hi * s_hi + lo * s_lo``
    with ``hi`` (rows ``:m``) the symmetric per-row int8 rounding of ``x`` and ``lo`` (rows ``m:``)
    that of the remainder, so each row keeps ~15 bits relative to its largest element."""

    def round_rows(v):
        scale = jnp.max(jnp.abs(v), axis=-1, keepdims=True) / 127.0
        scale = jnp.where(scale > 0, scale, 1.0)  # an all-zero row (padding) stays zero
        return jnp.round(v / scale), scale

    x = x.astype(jnp.float32)
    hi, s_hi = round_rows(x)
    lo, s_lo = round_rows(x - hi * s_hi)
    return jnp.concatenate([hi, lo]).astype(jnp.int8), jnp.concatenate([s_hi, s_lo])


def take_rows(w: QuantizedWeight, ids: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """Rows `ids` of a quantized ``[vocab, hidden]`` table, dequantized to `dtype`."""
    rows = jnp.take(w.q, ids, axis=0).astype(jnp.float32)
    return (rows * jnp.take(w.scale, ids, axis=0)[..., None]).astype(dtype)
