"""The seed's sizing rule, checked before any weight is read: weights plus KV cache must fit in
per-device memory times the tensor-parallel degree; and handing freed host memory back while
weights are placed."""

from __future__ import annotations

import functools
import math
import os

from nx.errors import ResourceError
from nx.family import WeightMap
from nx.spec import ModelSpec


def estimate_bytes(spec: ModelSpec, weight_map: WeightMap, batch_size: int, positions: int, itemsize: int) -> tuple[int, int]:
    """(weight bytes, KV cache bytes) the loaded model will occupy on its devices in total."""
    weights = sum(math.prod(w.shape) for w in weight_map.values()) * itemsize
    cache = 2 * spec.n_layers * batch_size * positions * spec.kv_heads * spec.head_dim * itemsize
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
