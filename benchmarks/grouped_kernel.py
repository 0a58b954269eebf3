"""Microbenchmark of nx-kernels-cpu's grouped kernel (s4 / GGUF Q4_0 layout: 4-bit symmetric, groups
of 32, f16 scales; ``--bits 8``: Q8_0's int8 groups of 32) at the 1B llama's (or SmolLM2's) shapes, and of XLA's dequantized path for prompt rows.

    python benchmarks/grouped_kernel.py [--shapes 1b|smollm2] [--rows 1,8,16,128] [--xla-rows 16,128,1024] [--repeats 7] [--level avx2] [--threads 1]
        [--copies 24] [--layouts rows,panel] [--bits 8]

Prints one line per (shape, rows, path): median and best wall ms of `--repeats` timed calls (after a
warm-up), and from the best: GB/s of the packed weight (nibbles + f16 scales) and GMAC/s. Runs with whatever nx and
nx-kernels-cpu the interpreter imports, so the same script measures two builds A/B. ``--copies N``
times N distinct weights of each shape in turn (per call: the mean over them), so that they stream
from memory as a model's decode step does; with one (the default) a weight of ~2-9 MB stays in the
L3 cache between calls. ``--layouts`` picks the weight layouts the kernel reads: ``rows`` (as
stored) and ``panel`` (`nx.ops.quant.QuantizedWeight.panel`, transposed at load).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp
import kernel_bench
import numpy as np

# [out, in]: attention / MLP up / MLP down of a 1B llama; SmolLM2-135M's fused qkv, o, gate+up, down
SHAPES = {"1b": [(2048, 2048), (8192, 2048), (2048, 8192)],
          "smollm2": [(960, 576), (576, 576), (3072, 576), (576, 1536)]}


def _weight(n: int, k: int, seed: int = 0, panel: bool = False, bits: int = 4):
    from nx.ops.quant import QuantizedWeight, to_panels

    rng = np.random.default_rng(seed)
    if bits == 4:
        q = rng.integers(0, 256, (n, k // 2)).astype(np.uint8)
    else:
        q = rng.integers(-128, 128, (n, k)).astype(np.int8)
    scale = rng.uniform(1e-3, 1e-1, (n, k // 32)).astype(np.float16)
    if panel:
        q, scale = to_panels(q, bits), to_panels(scale)
    return QuantizedWeight(kernel_bench.weight(q), kernel_bench.weight(scale), bits=bits, group_size=32, panel=panel)


def _time(f, x, ws, repeats: int) -> tuple[float, float]:
    """Median and best wall seconds a call of `repeats` rounds of calls on each weight of `ws` (the
    best is steadier on a loaded machine)."""
    for w in ws:
        jax.block_until_ready(f(x, w))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for w in ws:
            jax.block_until_ready(f(x, w))
        times.append((time.perf_counter() - t) / len(ws))
    return statistics.median(times), min(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="1,8,16,128")
    ap.add_argument("--xla-rows", default="")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--level", default=None, help="the kernel's level (avx512_vnni, avx2, scalar; default: the CPU's best)")
    ap.add_argument("--threads", type=int, default=0, help="the kernel's threads (default 0: XLA's pool)")
    ap.add_argument("--copies", type=int, default=1, help="distinct weights a shape, timed in turn (24: from memory)")
    ap.add_argument("--layouts", default="rows,panel", help="weight layouts the kernel reads: rows, panel")
    ap.add_argument("--shapes", default="1b", choices=sorted(SHAPES), help="the model whose matrices to time")
    ap.add_argument("--bits", type=int, default=4, choices=(4, 8), help="4: s4 / Q4_0; 8: grouped s8 / Q8_0")
    args = ap.parse_args()
    import nx_kernels_cpu

    from nx.ops import quant

    for n, k in SHAPES[args.shapes]:
        kern = jax.jit(lambda x, w: nx_kernels_cpu.grouped_matmul(
            x, w.q, w.scale, bits=w.bits, group_size=32, level=args.level, threads=args.threads, panel=w.panel))
        weights = {layout: [_weight(n, k, seed, layout == "panel", args.bits) for seed in range(args.copies)]
                   for layout in args.layouts.split(",")}
        gb = n * k * (args.bits / 8 + 2 / 32) / 1e9
        paths = [(f"kernel-{layout}", kern, args.rows, ws) for layout, ws in weights.items()]
        if args.xla_rows:
            paths.append(("xla-dequant", jax.jit(quant.matmul), args.xla_rows, next(iter(weights.values()))))
        for name, f, rows, ws in paths:
            for m in (int(r) for r in rows.split(",")):
                x = jnp.asarray(np.random.default_rng(m).standard_normal((m, k)).astype(np.float32))
                if name == "xla-dequant":
                    os.environ["NX_CPU_KERNELS"] = "off"
                    f = jax.jit(quant.matmul)  # traced now, with the kernels off
                med, t = _time(f, x, ws, repeats=args.repeats)
                os.environ.pop("NX_CPU_KERNELS", None)
                print(f"{n}x{k} m={m:4d} {name:12s} median {med * 1e3:8.3f} ms, best {t * 1e3:8.3f} ms "
                      f"{gb / t:6.1f} GB/s {m * n * k / t / 1e9:7.1f} GMAC/s", flush=True)


if __name__ == "__main__":
    main()
