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


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_uniform_rows_round_each_token_alike_beside_any_others(dtype):
    """Inside `nx.ops.uniform_rows` a token's products are the same bits whatever the number of
    tokens beside it and wherever it sits (what lets a serving step share its products between
    decode rows and a prompt chunk); the row-count-tuned formulation outside it makes no such promise."""
    from nx import ops

    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.standard_normal((640, 576)), dtype)
    x = jnp.asarray(rng.standard_normal((1, 90, 576)), dtype)

    @jax.jit
    def product(x, w):
        with ops.uniform_rows():
            return ops.linear(x, {"w": w})

    alone = np.asarray(product(x[:, :1], w))
    for n in (2, 4, 16, 17, 90):
        assert np.array_equal(np.asarray(product(x[:, :n], w))[:, :1], alone), n
    flipped = np.asarray(product(x[:, ::-1], w))[:, ::-1]
    assert np.array_equal(flipped, np.asarray(product(x, w)))
