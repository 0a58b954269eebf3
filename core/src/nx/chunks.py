"""Column-blocked weights, so XLA:CPU streams one matmul with all cores.

XLA:CPU runs a matrix-vector product (a decode step's every linear) on one thread, which reaches
about half of this machine's memory bandwidth; independent dots, though, run concurrently. So on
CPU each large weight is stored as `n` separate column blocks (vocabulary row blocks for the
embedding / lm-head table): one dot per block, results concatenated. Measured on 2 cores: 30
chained 576x3072 matvecs took 10-12 ms as one weight each, 3.4-5.2 ms as two blocks. In the
whole SmolLM2 decode program the gain did not show above the noise of a shared machine, so this
is opt-in (``nx.load(..., matmul_chunks=2)``) until a quiet measurement says otherwise.
Not used with tensor parallelism (the shards already run in parallel) or int8 weights.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

#: Parameters stored in blocks: per-layer linears split their output columns, tables their rows.
COLUMN_SPLIT = ("qkv", "o", "up", "down")
ROW_SPLIT = ("embed", "lm_head")
MAX_CHUNKS = 8


def default_chunks(backend: str, tp_degree: int) -> int:
    """1 (off) until measured to help; `cpu_chunks()` is the value to try on CPU."""
    return 1


def cpu_chunks() -> int:
    """One block per core (capped) for CPU runs without tensor parallelism."""
    return max(1, min(os.cpu_count() or 1, MAX_CHUNKS))


def _splittable(a: Any) -> bool:
    return isinstance(a, np.ndarray) and a.ndim == 2 and np.issubdtype(a.dtype, np.floating)


def split(params: dict, n: int) -> dict:
    """Replace big float weights of a host parameter tree by tuples of `n` blocks."""
    if n <= 1:
        return params
    for layer in params["layers"]:
        for name in COLUMN_SPLIT:
            w = layer.get(name, {}).get("w")
            if _splittable(w):
                layer[name]["w"] = tuple(np.ascontiguousarray(b) for b in np.array_split(w, n, axis=1))
    for name in ROW_SPLIT:
        w = params.get(name, {}).get("w")
        if _splittable(w):
            params[name]["w"] = tuple(np.ascontiguousarray(b) for b in np.array_split(w, n, axis=0))
    return params


def restore(tree: Any) -> Any:
    """Turn ``{"0": a, "1": b}`` (blocks as a saved artifact nests them) back into tuples."""
    if isinstance(tree, dict):
        if tree and all(k.isdigit() for k in tree):
            return tuple(restore(tree[str(i)]) for i in range(len(tree)))
        return {k: restore(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [restore(v) for v in tree]
    return tree
