"""XLA compiler options nx sets per program (never process-wide, so other jax code is unaffected).

On x86 CPUs with AVX-512, XLA:CPU still vectorizes for 256-bit registers by default; asking for
512-bit vectors measured ~6-8% faster batch-1 decode of SmolLM2 on an AVX-512 Xeon (BENCHMARKS.md).

Every program rounds where it says it rounds: by default XLA may skip a bf16/f16 rounding
between two fused ops ("excess precision"), and which ones it skips depends on how the program
is laid out, so a model's bf16 tokens changed with `unroll` (tiny models: 46-100% of greedy tokens
equal between the scanned and the unrolled program; now identical). It costs SmolLM2 bf16 on the
CPU 0-5% of decode speed and 0-10% of prompt time (BENCHMARKS.md; unmeasured on GPUs);
f32 programs compile to the same HLO. Not set for PJRT plugins (Neuron), which may not accept
XLA debug options.

A value the user already put in ``XLA_FLAGS`` wins.
"""

from __future__ import annotations

import functools
import os

VECTOR_WIDTH = "xla_cpu_prefer_vector_width"
EXCESS_PRECISION = "xla_allow_excess_precision"
EXACT_ROUNDING_PLATFORMS = ("cpu", "gpu", "cuda")  # XLA's own backends; plugins (Neuron) may reject it


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


def compiler_options(platform: str) -> dict[str, int | bool]:
    """Options for `Lowered.compile(compiler_options=...)` of a program running on `platform`."""
    user = os.environ.get("XLA_FLAGS", "")
    options: dict[str, int | bool] = {}
    if platform in EXACT_ROUNDING_PLATFORMS and EXCESS_PRECISION not in user:
        options[EXCESS_PRECISION] = False
    if platform == "cpu" and VECTOR_WIDTH not in user and "avx512f" in cpu_flags():
        options[VECTOR_WIDTH] = 512
    return options
