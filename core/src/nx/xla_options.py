"""XLA compiler options nx sets per program (never process-wide, so other jax code is unaffected).

On x86 CPUs with AVX-512, XLA:CPU still vectorizes for 256-bit registers by default; asking for
512-bit vectors measured ~6-8% faster batch-1 decode of SmolLM2 on an AVX-512 Xeon (BENCHMARKS.md).
A value the user already put in ``XLA_FLAGS`` wins.
"""

from __future__ import annotations

import functools
import os

VECTOR_WIDTH = "xla_cpu_prefer_vector_width"


def default_workers() -> int:
    """Threads nx compiles (or deserializes) programs on by default: one per CPU, at most 4. XLA
    does that work outside the GIL, so the threads run side by side."""
    return min(4, os.cpu_count() or 1)


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU feature flags of this machine (Linux ``/proc/cpuinfo``, read once; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def compiler_options(platform: str) -> dict[str, int]:
    """Options for `Lowered.compile(compiler_options=...)` of a program running on `platform`."""
    if platform != "cpu" or VECTOR_WIDTH in os.environ.get("XLA_FLAGS", ""):
        return {}
    return {VECTOR_WIDTH: 512} if "avx512f" in cpu_flags() else {}
