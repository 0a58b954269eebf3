"""The KV cache is updated in place and read where it lies: no compiled program copies a whole
cache, whichever position bucket it attends over (XLA:CPU did, at every step, for windows smaller
than the cache and for caches laid out [batch, positions, heads, dim])."""

from __future__ import annotations

import re

import pytest

import nx
from tests.cases.llama import CASES

CASE = CASES[0]
COPY = re.compile(r"= (\S+?)\{[^}]*\} copy\(")  # the copied shape, e.g. f32[2,16,64] of "= f32[2,16,64]{2,1,0} copy("


@pytest.mark.parametrize("rows,tokens", [(1, 1), (2, 1), (1, 16)])  # decode at batch 1 and 2, prefill
def test_programs_never_copy_a_whole_cache(saved_case, rows, tokens):
    _, path = saved_case(CASE)
    model = nx.load("llama", path, batch_size=rows, n_positions=[32, 64], context_length_estimate=[16],
                    compile=False, progress=False)
    k, v = model.caches[0]
    shapes = {"f32[" + ",".join(map(str, a.shape)) + "]" for a in (k, v)}
    for window in (32, 64):
        entry = model.lower(rows, tokens, window).compile().as_text().split("ENTRY", 1)[1]
        lines = entry.splitlines()
        copies = [line for line in lines if (m := COPY.search(line)) and m.group(1) in shapes]
        assert not copies, f"window {window}: {copies[:2]}"
        # each layer's K and V are written once, in place (no duplicated update fused into a reader)
        updates = sum(line.count("dynamic-update-slice") for line in lines if " fusion(" in line and "caches" in line)
        assert updates <= 2 * model.spec.n_layers
