"""What the kernel microbenchmarks share (`bf16_kernel.py`, `s8_kernel.py`, `f32_kernel.py`): the
matrix shapes of decode, weights placed as nx places them, a timed chain of matmuls, and another
build of the kernel library as a baseline in the same process (A/B without reinstalling)."""

from __future__ import annotations

import ctypes
import os

import jax
import jax.numpy as jnp
import numpy as np

#: [n, k] of each model's matmuls: the qkv parts, o, up / gate, down and the lm head.
SHAPES = {
    "smollm2": [(576, 576), (192, 576), (1536, 576), (576, 1536), (49152, 576)],
    "1b": [(2048, 2048), (512, 2048), (8192, 2048), (2048, 8192), (128256, 2048)],
}


def weight(a) -> jax.Array:
    """A host weight on the CPU device as `nx.load` puts it there: in a `nx.memory.WeightArena`
    (huge pages; ``NX_HUGE_PAGES=0``: plain pages)."""
    from nx.memory import WeightArena

    return jax.device_put(WeightArena().copy(np.asarray(a)), jax.devices("cpu")[0])


def runner(fn, x, ws, env=None):
    """One program over the weights in turn, compiled and run once; returns a timed call. Each x
    waits for the last product (a tiny fusion, as decode has between its matmuls), so the matmuls
    run one after another. `env`: the `NX_CPU_KERNELS` value the program is traced under."""

    def chain(x, ws):
        for w in ws:
            y = fn(x, w)
            x = x + (y[:, :1] * 0).astype(x.dtype)
        return y

    from nx.ops import cpu_kernels

    f = jax.jit(chain)
    saved = os.environ.get(cpu_kernels.ENV)
    if env is not None:  # read when the program is traced
        os.environ[cpu_kernels.ENV] = env
    try:
        jax.block_until_ready(f(x, ws))
    finally:
        if saved is None:
            os.environ.pop(cpu_kernels.ENV, None)
        else:
            os.environ[cpu_kernels.ENV] = saved
    return lambda: jax.block_until_ready(f(x, ws))


def baseline(path: str, symbol: str, level: int, threads: int, **attrs: int):
    """The FFI handler `symbol` (e.g. ``NxS8Matmul``) of another ``libnx_kernels_cpu.so`` at `path`,
    registered under its own target: ``call(*operands, n=)`` returns its f32 ``[m, n]``. `attrs`: the
    handler's other int32 attributes, where that build has them."""
    target = f"bench_baseline_{symbol}"
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(ctypes.CDLL(path), symbol)), platform="cpu")
    extra = {name: np.int32(v) for name, v in attrs.items()}

    def call(*operands, n: int):
        out = jax.ShapeDtypeStruct((operands[0].shape[0], n), jnp.float32)
        return jax.ffi.ffi_call(target, out)(*operands, level=np.int32(level), threads=np.int32(threads), **extra)

    return call


def alternate(runs: dict, repeats: int, count: int = 1) -> dict:
    """Seconds per matmul of each timed call in `runs` (name -> call over `count` matmuls), the
    calls taken in turn `repeats` times so that machine noise hits them alike."""
    import time

    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            times[name].append((time.perf_counter() - t0) / count)
    return times
