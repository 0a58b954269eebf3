"""The KV cache is updated in place and read where it lies: no compiled program copies a whole
cache, whichever position bucket it attends over (XLA:CPU did, at every step, for windows smaller
than the cache, for caches laid out [batch, positions, heads, dim], and for bf16 caches written
through a uint16 view of bf16 arrays)."""

from __future__ import annotations

import re

import pytest

import nx
import nx.buckets
from tests.cases.llama import CASES

CASE = CASES[0]
COPY = re.compile(r"= \w+(\[[\d,]*\])\{[^}]*\} copy\(")  # the copied shape, e.g. [2,16,64] of "= f32[2,16,64]{2,1,0} copy("


@pytest.mark.parametrize("amp", ["f32", "bf16"])
@pytest.mark.parametrize("rows,tokens", [(1, 1), (2, 1), (1, 16)])  # decode at batch 1 and 2, prefill
def test_programs_never_copy_a_whole_cache(saved_case, rows, tokens, amp):
    _, path = saved_case(CASE)
    model = nx.load("llama", path, batch_size=rows, n_positions=[32, 64], context_length_estimate=[16],
                    amp=amp, compile=False, progress=False)
    k, v = model.caches[0]
    shapes = {"[" + ",".join(map(str, a.shape)) + "]" for a in (k, v)}
    for window in (32, 64):
        entry = model.lower(rows, tokens, window).compile().as_text().split("ENTRY", 1)[1]
        lines = entry.splitlines()
        copies = [line for line in lines if (m := COPY.search(line)) and m.group(1) in shapes]
        assert not copies, f"window {window}: {copies[:2]}"
        # each layer's K and V are written once per row and kv head, in place (no duplicated update
        # fused into a reader)
        updates = sum(line.count("dynamic-update-slice") for line in lines if " fusion(" in line and "caches" in line)
        assert updates <= 2 * model.spec.n_layers * rows * model.spec.kv_heads


@pytest.mark.parametrize("amp", ["f32", "bf16"])
def test_insert_programs_never_copy_a_whole_cache(saved_case, amp):
    """The continuous-batching insert (one prompt into one row of a batch of 3) writes and reads
    that row in place too."""
    _, path = saved_case(CASE)
    model = nx.load("llama", path, batch_size=3, n_positions=[32, 64], context_length_estimate=[16],
                    amp=amp, compile=False, progress=False)
    shapes = {"[" + ",".join(map(str, a.shape)) + "]" for a in model.caches[0]}
    for key in model.programs.keys + nx.buckets.serving_keys(model.config):
        entry = model.programs.lower(key).compile().as_text().split("ENTRY", 1)[1]
        copies = [line for line in entry.splitlines() if (m := COPY.search(line)) and m.group(1) in shapes]
        assert not copies, f"{key.name}: {copies[:2]}"


def test_bf16_cache_reads_the_same_in_any_window(saved_case):
    """A 16-bit cache is held as uint16 bits and read through a gather in every window: greedy
    tokens within 32 positions are the same whether the cache has 32 or 64 positions."""
    import numpy as np

    _, path = saved_case(CASE)
    ids = np.random.default_rng(5).integers(1, CASE.vocab, (2, 9))
    outs = []
    for n_positions in ([32], [32, 64]):
        model = nx.load("llama", path, batch_size=2, n_positions=n_positions, context_length_estimate=[16],
                        amp="bf16", progress=False)
        assert model.caches[0][0].dtype == np.uint16
        outs.append(np.asarray(model.generate(ids, max_new_tokens=20, min_new_tokens=20)))
    assert np.array_equal(outs[0], outs[1])


def test_uint16_cache_takes_only_16_bit_float_bits():
    """Writing f32 keys into a uint16 (16-bit float) cache would be a value cast, not the bits."""
    import jax.numpy as jnp

    from nx import ops

    caches = tuple(jnp.zeros(s, ops.cache_dtype(jnp.bfloat16)) for s in ops.cache_shapes(1, 8, 2, 4))
    kv = jnp.ones((1, 1, 2, 4), jnp.bfloat16) * 1.5
    k, v = ops.update_caches(caches, kv, kv, jnp.array([3], jnp.int32))
    assert k.dtype == jnp.uint16 and float(ops.cache_windows((k, v), 8, 2, dtype=jnp.bfloat16)[1][0, 3, 0]) == 1.5
    with pytest.raises(TypeError, match="bf16 or f16"):
        ops.update_caches(caches, kv.astype(jnp.float32), kv.astype(jnp.float32), jnp.array([3], jnp.int32))
