"""`nx.memory.WeightArena`: the host memory CPU weights live in, and that placed weights live there."""

from __future__ import annotations

import mmap
from pathlib import Path

import jax
import ml_dtypes
import numpy as np
import pytest

import nx
from nx import memory
from tests.cases.llama import CASES

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def thp_mode() -> str | None:
    """The bracketed mode of transparent huge pages ("always", "madvise", "never"), or None."""
    try:
        text = THP.read_text()
    except OSError:
        return None
    return text[text.index("[") + 1 : text.index("]")]


def vma_flags(address: int) -> dict[str, str]:
    """The /proc/self/smaps fields of the mapping that holds `address`."""
    fields: dict[str, str] = {}
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(v, 16) for v in head.split("-"))
                if inside:
                    break
                inside = lo <= address < hi
            elif inside:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    return fields


def test_copies_are_equal_aligned_contiguous_and_share_chunks():
    arena = memory.WeightArena()
    rng = np.random.default_rng(0)
    small = [rng.standard_normal((n, 7)).astype(dt) for n, dt in [(3, np.float32), (5, ml_dtypes.bfloat16), (1, np.int8)]]
    copies = [arena.copy(a) for a in small]
    for a, c in zip(small, copies):
        assert c.dtype == a.dtype and c.shape == a.shape and c.flags.c_contiguous
        np.testing.assert_array_equal(c.view(np.uint8), a.view(np.uint8))
        assert c.ctypes.data % memory.ALIGN == 0
    # small tensors are packed one after another into the same chunk
    starts = [c.ctypes.data for c in copies]
    assert starts == sorted(starts) and starts[-1] - starts[0] < memory.ARENA_CHUNK


def test_a_large_tensor_gets_a_huge_page_aligned_mapping_of_its_own():
    arena = memory.WeightArena()
    small = arena.copy(np.ones(10, np.float32))
    src = np.random.default_rng(1).integers(0, 256, memory.ARENA_CHUNK // 4 + 8, dtype=np.uint8)
    big = arena.copy(src)
    assert big.ctypes.data % memory.HUGE_PAGE == 0
    np.testing.assert_array_equal(big, src)
    after = arena.copy(np.ones(10, np.float32))  # the shared chunk goes on after the big one
    assert after.ctypes.data == small.ctypes.data + memory.ALIGN


def test_a_copy_outlives_the_arena():
    c = memory.WeightArena().copy(np.full((4, 4), 3.0, np.float32))
    assert float(c.sum()) == 48.0


def test_device_put_reads_an_arena_copy_in_place():
    a = memory.WeightArena().copy(np.arange(64, dtype=np.float32).reshape(8, 8))
    x = jax.device_put(a, jax.devices("cpu")[0])
    assert x.unsafe_buffer_pointer() == a.ctypes.data
    np.testing.assert_array_equal(np.asarray(x), a)


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or thp_mode() not in ("madvise", "always"),
                    reason="transparent huge pages are not available here")
@pytest.mark.parametrize("huge", ["1", "0"])
def test_placed_cpu_weights_sit_in_huge_page_mappings(saved_case, monkeypatch, huge):
    monkeypatch.setenv("NX_HUGE_PAGES", huge)
    _, path = saved_case(CASES[0])
    model = nx.load(CASES[0].family, path, batch_size=1, n_positions=[32], compile=False, progress=False)
    leaves = jax.tree.leaves(model.params)
    eligible = [vma_flags(leaf.unsafe_buffer_pointer()).get("THPeligible") for leaf in leaves]
    if huge == "1":
        assert eligible == ["1"] * len(leaves)
    elif thp_mode() == "madvise":  # without the advice, only "always" makes them eligible
        assert "1" not in eligible
