"""int8 weights inside the compiled programs: the `QuantizedWeight` pytree and its dequantization.

A quantized weight is ``q`` (int8, the weight's own shape: ``[out, in]`` for a linear weight,
``[vocab, hidden]`` for an embedding / lm-head table) and ``scale`` (f32, one per output channel,
i.e. per row), with ``w ~= q * scale[:, None]``. Keeping ``scale`` 1-D along the rows means
tensor-parallel sharding by role applies unchanged: a column-parallel weight splits ``q``'s rows
and ``scale`` with them, a row-parallel weight splits ``q``'s columns and replicates ``scale``, a
vocabulary-parallel table splits both along vocab.

`dequant_dtype` is static (pytree aux data): the dtype the int8 values are converted to for the
matmul. The products are scaled per output *after* the dot, ``(x @ q.T) * scale`` (one multiply
per output instead of one per weight). On XLA:CPU what matters most is converting the
int8 values tile by tile inside a loop: converting whole weights, with or without the scale, made
XLA materialize f32 copies of every weight per step and decoded SmolLM2-135M 5x slower than f32
(7 against 36 tokens/s), while the tiled loop runs at f32 speed (38 tokens/s) from a quarter of
the bytes (``benchmarks/int8.py``).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax

DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


class QuantizedWeight:
    """``q`` int8 ``[out, in]`` (a linear weight or a ``[vocab, hidden]`` table) and per-row ``scale``.

    A jax pytree with leaves ``q`` and ``scale`` (their dotted names end in ``.q`` / ``.scale``) and
    the static `dequant_dtype` (``"f32"``, ``"bf16"`` or ``"f16"``). `dtype` is the model's
    activation dtype (its ``amp``; rows looked up from a table come out in it) and `blocked` whether
    matmuls convert the int8 values tile by tile in a loop (right for XLA:CPU; accelerators fuse the
    conversion into the dot, so nx sets it only for the cpu backend), both static too.
    """

    __slots__ = ("q", "scale", "dequant_dtype", "dtype", "blocked")

    def __init__(
        self,
        q: Any,
        scale: Any,
        dequant_dtype: str = "f32",
        dtype: str | None = None,
        blocked: bool = True,
    ) -> None:
        self.q = q
        self.scale = scale
        self.dequant_dtype = dequant_dtype
        self.dtype = dtype or dequant_dtype
        self.blocked = blocked

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
            f"dtype={self.dtype!r}, blocked={self.blocked})"
        )


def _flatten_with_keys(w: QuantizedWeight):
    keys = (jax.tree_util.GetAttrKey("q"), jax.tree_util.GetAttrKey("scale"))
    return tuple(zip(keys, (w.q, w.scale))), (w.dequant_dtype, w.dtype, w.blocked)


def _flatten(w: QuantizedWeight):
    return (w.q, w.scale), (w.dequant_dtype, w.dtype, w.blocked)


def _unflatten(aux, children) -> QuantizedWeight:
    return QuantizedWeight(children[0], children[1], *aux)


jax.tree_util.register_pytree_with_keys(QuantizedWeight, _flatten_with_keys, _unflatten, _flatten)


def is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedWeight)


#: Elements of int8 weight converted per step of the blocked loops below. Converting a whole
#: weight at once makes XLA:CPU materialize f32 copies of every weight as temporaries (measured
#: 2 tokens/s on SmolLM2-135M); converting cache-sized tiles inside a loop keeps them hot.
TILE = int(os.environ.get("NX_INT8_TILE", 64 * 1024))
#: Tile size when many activation rows share each converted tile (prompt encoding).
TILE_PREFILL = int(os.environ.get("NX_INT8_TILE_PREFILL", 256 * 1024))


def _n_blocks(rows: int, cols: int, m: int = 1) -> int:
    """Fewest equal blocks of `rows` whose tiles hold at most a tile of elements (1: no blocking);
    `m` is the number of activation rows multiplied with each tile."""
    tile = TILE if m <= 8 else TILE_PREFILL
    if tile <= 0 or rows * cols <= tile:
        return 1
    for nb in range(-(-rows * cols // tile), rows + 1):
        if rows % nb == 0:
            return nb
    return 1


def matmul(x: jnp.ndarray, w: QuantizedWeight) -> jnp.ndarray:
    """f32 ``x @ (q * scale).T`` for an ``[out, in]`` weight or ``[vocab, hidden]`` table, computed
    as ``(x @ q.T) * scale``: blocks of int8 rows are converted one at a time in a loop (each block
    yields a slice of the outputs) and the per-row scales applied once to the result."""
    dt = w.compute_dtype
    n, k = w.q.shape
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k).astype(dt)
    dims = (((1,), (1,)), ((), ()))
    nb = _n_blocks(n, k, x2.shape[0]) if w.blocked else 1
    if nb == 1:
        y = lax.dot_general(x2, w.q.astype(dt), dims, preferred_element_type=jnp.float32)
    else:
        qb = w.q.reshape(nb, n // nb, k)

        def body(carry, qi):
            return carry, lax.dot_general(x2, qi.astype(dt), dims, preferred_element_type=jnp.float32)

        _, ys = lax.scan(body, 0, qb)  # [nb, M, n // nb]
        y = jnp.moveaxis(ys, 0, 1).reshape(x2.shape[0], n)
    return (y * w.scale).reshape(*lead, n)


def take_rows(w: QuantizedWeight, ids: jnp.ndarray, dtype: Any) -> jnp.ndarray:
    """Rows `ids` of a quantized ``[vocab, hidden]`` table, dequantized to `dtype`."""
    rows = jnp.take(w.q, ids, axis=0).astype(jnp.float32)
    return (rows * jnp.take(w.scale, ids, axis=0)[..., None]).astype(dtype)
