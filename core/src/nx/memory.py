"""The seed's sizing rule, checked before any weight is read: weights plus KV cache must fit in
per-device memory times the tensor-parallel degree; handing freed host memory back while weights
are placed; and the huge-page host memory the CPU backend's weights live in (`WeightArena`)."""

from __future__ import annotations

import contextlib
import functools
import math
import mmap
import os

import numpy as np

from nx.errors import ResourceError
from nx.family import WeightMap
from nx.spec import ModelSpec


def estimate_bytes(spec: ModelSpec, weight_map: WeightMap, batch_size: int, positions: int, itemsize: int,
                   cache_itemsize: int | None = None) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) the loaded model will occupy on its devices in total (the
    cache's values `cache_itemsize` bytes each; default: `itemsize`)."""
    weights = sum(math.prod(w.shape) for w in weight_map.values()) * itemsize
    cache = 2 * spec.n_layers * batch_size * positions * spec.kv_heads * spec.head_dim * (cache_itemsize or itemsize)
    return weights, cache


def device_memory(device) -> int:
    """Bytes one device offers: the accelerator's limit, or host RAM shared by the CPU devices."""
    stats = None
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices may not report
        stats = None
    if stats and stats.get("bytes_limit"):
        return int(stats["bytes_limit"])
    import jax

    n_local = max(1, len(jax.local_devices(backend=device.platform)))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // n_local


def check_fits(
    weights: int, cache: int, per_device: int, tp: int, valid_degrees: list[int], available: int
) -> None:
    total = weights + cache
    if total <= per_device * tp:
        return
    fitting = [d for d in valid_degrees if total <= per_device * d and d <= available]
    hint = (
        f"use tp_degree={fitting[0]} (--tp {fitting[0]})"
        if fitting
        else "no tp degree fits the available devices; lower batch_size/n_positions, use amp='bf16' or int8 weights "
        "(--batch-size, --n-positions, --amp bf16, --quant s8)"
    )
    gib = 2**30
    raise ResourceError(
        f"the model needs {total / gib:.2f} GiB (weights {weights / gib:.2f} GiB + KV cache {cache / gib:.2f} GiB) but "
        f"tp_degree={tp} devices offer {per_device * tp / gib:.2f} GiB ({per_device / gib:.2f} GiB each); {hint}"
    )


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where there is no glibc (looked up once)."""
    try:
        import ctypes

        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


#: Host bytes released between two `return_freed_memory` calls while weights are converted or
#: placed: now and then, not per tensor (each call walks the heap).
TRIM_BYTES = 64 << 20


def return_freed_memory() -> None:
    """Hand memory freed on the host heap back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Host weights are released one by one as they are placed on the devices, but glibc keeps much of
    the freed heap mapped; trimming after each one lowered SmolLM2's resident size after loading
    its GGUF by ~90 MB.
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


#: A `WeightArena`'s shared chunk; a tensor above a quarter of it gets a mapping of its own.
ARENA_CHUNK = 64 << 20
HUGE_PAGE = 2 << 20
ALIGN = 64


class WeightArena:
    """Host memory for weights the CPU backend reads in place, on transparent huge pages.

    Contract: `copy(a)` returns a C-contiguous copy of `a` starting at a 64-byte boundary inside an
    anonymous private mapping aligned to 2 MiB and advised ``MADV_HUGEPAGE`` (Linux; plain pages
    where the advice does not exist or transparent huge pages are off). `jax.device_put` of such an
    array on a CPU device aliases it rather than copying, so XLA:CPU's kernels read the weights from
    huge pages. A mapping lives as long as any array in it; nothing may write to an array once it
    is placed (XLA takes it as immutable). ``NX_HUGE_PAGES=0`` turns the advice off.

    Why: XLA's allocator puts each weight on 4 KiB pages, and a batch-1 decode step on these VMs lost
    ~5-10% of its time to TLB misses while streaming them (BENCHMARKS.md, "Weights on huge pages").
    """

    def __init__(self) -> None:
        self._chunk: np.ndarray | None = None
        self._used = 0

    @staticmethod
    def advised() -> bool:
        """Whether new mappings are advised to use huge pages here."""
        return hasattr(mmap, "MADV_HUGEPAGE") and os.environ.get("NX_HUGE_PAGES", "1") != "0"

    @classmethod
    def _map(cls, nbytes: int) -> np.ndarray:
        """`nbytes` (rounded up to 2 MiB) of fresh zeroed memory starting at a 2 MiB boundary."""
        size = -(-nbytes // HUGE_PAGE) * HUGE_PAGE
        m = mmap.mmap(-1, size + HUGE_PAGE, flags=mmap.MAP_PRIVATE)  # fileno -1: anonymous
        raw = np.frombuffer(m, np.uint8)
        start = -raw.ctypes.data % HUGE_PAGE  # a multiple of the 4 KiB page, as madvise needs
        if cls.advised():
            with contextlib.suppress(OSError):  # a kernel without transparent huge pages: plain pages
                m.madvise(mmap.MADV_HUGEPAGE, start, size)
        return raw[start : start + size]  # the view keeps the mapping alive

    def copy(self, a: np.ndarray) -> np.ndarray:
        """A copy of `a` in the arena (see the class docstring)."""
        a = np.asarray(a)
        n = a.nbytes
        if n > ARENA_CHUNK // 4:
            block = self._map(n)[:n]
        else:
            if self._chunk is None or self._used + n > self._chunk.nbytes:
                self._chunk, self._used = self._map(ARENA_CHUNK), 0
            block = self._chunk[self._used : self._used + n]
            self._used += -(-max(n, 1) // ALIGN) * ALIGN
        out = block.view(a.dtype).reshape(a.shape)
        out[...] = a
        return out
