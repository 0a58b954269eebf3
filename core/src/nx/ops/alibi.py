"""ALiBi attention biases (BLOOM), including head counts that are not a power of two."""

from __future__ import annotations

import math

import numpy as np


def alibi_slopes(n_heads: int) -> np.ndarray:
    """Per-head slopes ``[n_heads]`` exactly as BLOOM's reference computes them."""
    closest = 2 ** math.floor(math.log2(n_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = [base ** (i + 1) for i in range(closest)]
    if closest != n_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        n_extra = min(closest, n_heads - closest)
        slopes += [extra_base ** (i + 1) for i in range(0, 2 * n_extra, 2)]
    return np.asarray(slopes, dtype=np.float32)
