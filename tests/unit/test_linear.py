"""`nx.ops.linear.project` picks a matmul form by shape (matrix-vector products of small weights per
row half, ``(w @ x.T).T`` for a few rows, ``x @ w.T`` otherwise); every form computes ``x @ w.T``."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from nx.ops.linear import project


@pytest.mark.parametrize(
    "lead, out",
    [
        ((1, 1), 96),  # one row, small weight: two row halves as a batch
        ((1, 1), 97),  # odd row count: plain matrix-vector product
        ((1, 1), 4096),  # weight above SPLIT_BELOW: plain
        ((4, 1), 96),  # batched decode: (w @ x.T).T
        ((2, 8), 96),  # 16 rows: (w @ x.T).T
        ((1, 40), 96),  # prefill rows: x @ w.T
    ],
)
def test_every_form_computes_x_times_w_transposed(lead, out):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((*lead, 128)).astype(np.float32)
    w = rng.standard_normal((out, 128)).astype(np.float32)
    got = jax.jit(lambda a, b: project(a, b, jnp.float32))(x, w)
    assert got.shape == (*lead, out)
    np.testing.assert_allclose(np.asarray(got), x @ w.T, rtol=1e-5, atol=1e-4)
