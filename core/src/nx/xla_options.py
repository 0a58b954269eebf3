"""XLA compiler options nx sets per program (never process-wide, so other jax code is unaffected).

On x86 CPUs with AVX-512, programs are vectorized for 512-bit registers (XLA:CPU defaults to 256).
Multi-step decode programs (a while loop of decode steps) compile on the CPU without XLA's
loop-invariant code motion: it hoists the f32 copy of a bf16 embedding table that XLA:CPU gathers
from out of the loop, so every call wrote the whole table (a third of a bf16 SmolLM2 step's time).
Every program rounds where it says it rounds (no XLA "excess precision"), so 16-bit results do not
depend on how XLA fused a program; not set for PJRT plugins (Neuron), which may reject XLA debug
options. The measurements are in BENCHMARKS.md.

A value the user already put in ``XLA_FLAGS`` wins.
"""

from __future__ import annotations

import functools
import os

VECTOR_WIDTH = "xla_cpu_prefer_vector_width"
DISABLED_PASSES = "xla_disable_hlo_passes"
LOOP_HOISTING = "while-loop-invariant-code-motion"
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


def compiler_options(platform: str, loop: bool = False) -> dict[str, int | bool | str]:
    """Options for `Lowered.compile(compiler_options=...)` of a program running on `platform`;
    `loop`: the program runs decode steps in a while loop (``decode_steps`` > 1)."""
    user = os.environ.get("XLA_FLAGS", "")
    options: dict[str, int | bool | str] = {}
    if platform == "cpu" and loop and DISABLED_PASSES not in user:
        options[DISABLED_PASSES] = LOOP_HOISTING
    if platform in EXACT_ROUNDING_PLATFORMS and EXCESS_PRECISION not in user:
        options[EXCESS_PRECISION] = False
    if platform == "cpu" and VECTOR_WIDTH not in user and "avx512f" in cpu_flags():
        options[VECTOR_WIDTH] = 512
    return options
