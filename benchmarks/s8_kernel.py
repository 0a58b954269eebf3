"""The s8 kernel (nx-kernels-cpu, per-row int8 weights) against XLA's int8 formulation, decode and prompts.

For each weight shape ``[n, k]`` of SmolLM2-135M or the Llama-3.2-1B shape and each token row count
``m``, one jitted program runs ``x @ W.T`` over a list of distinct int8 weights of that shape
(together ``--stream-mb``, so each weight streams from memory, as in decode, but at most
``--max-count``: the smallest SmolLM2 shapes then stay in the L3), once through the
kernel (`nx_kernels_cpu.s8_matmul`, whatever the row count) and once through XLA's int8 formulation
(`nx.ops.quant.matmul` traced with ``NX_CPU_KERNELS=off``: `int8_terms`, an int8 dot, the scales).
The variants are timed alternately (``--repeats`` rounds); printed: median and best ms per matrix,
and GMAC/s of token rows (each token row is two int8 activation rows) from the median.

``--baseline LIB.so`` adds another build of the kernel library (e.g. main's, copied aside),
registered under its own FFI target and timed in the same rounds.

    python benchmarks/s8_kernel.py [--model smollm2,1b] [--rows 1,8,16,128,256] [--repeats 5] [--baseline SO]
"""

from __future__ import annotations

import argparse
import os
import statistics

import jax.numpy as jnp
import kernel_bench
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2,1b")
    ap.add_argument("--rows", default="1,8,16,128,256")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stream-mb", type=float, default=64.0, help="weight bytes per timed run (>= the LLC)")
    ap.add_argument("--max-count", type=int, default=16, help="at most this many weights (each compiles a dot)")
    ap.add_argument("--threads", type=int, default=0, help="the kernels' threads (0: XLA's pool)")
    ap.add_argument("--baseline", default="", help="another libnx_kernels_cpu.so to time alongside")
    ap.add_argument("--shapes", default="", help="only these n x k, e.g. 576x576,8192x2048")
    ap.add_argument("--no-xla", action="store_true", help="time the kernel builds only")
    args = ap.parse_args()
    import nx_kernels_cpu

    from nx.ops import quant
    from nx.ops.quant import QuantizedWeight

    variants = {"kernel": lambda x, w: nx_kernels_cpu.s8_matmul(x, w.q, w.scale, threads=args.threads)}
    if args.baseline:
        other = kernel_bench.baseline(args.baseline, "NxS8Matmul", nx_kernels_cpu.LEVELS[nx_kernels_cpu.isa()],
                                      args.threads)
        variants["baseline"] = lambda x, w: other(x, w.q, w.scale, n=w.shape[0])
    if not args.no_xla:
        variants["xla"] = quant.matmul
    only = {tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s}
    rng = np.random.default_rng(0)
    print(f"isa {nx_kernels_cpu.isa()}; ms per matrix (median / best), GMAC/s of token rows; "
          f"{args.repeats} rounds; load average {os.getloadavg()[0]:.2f}")
    head = " | ".join(f"{name + ' ms':>17} {'GMAC/s':>6}" for name in variants)
    ratios = [f"{name}/kernel" for name in variants if name != "kernel"]
    print(f"{'model':8} {'n x k':>12} {'m':>3} | {head} | {' '.join(f'{r:>14}' for r in ratios)}")
    for model in args.model.split(","):
        for n, k in kernel_bench.SHAPES[model]:
            if only and (n, k) not in only:
                continue
            count = min(args.max_count, max(1, int(np.ceil(args.stream_mb * 2**20 / (n * k)))))
            ws = [QuantizedWeight(kernel_bench.weight(rng.integers(-128, 128, (n, k), dtype=np.int8)),
                                  kernel_bench.weight(rng.uniform(1e-3, 1e-1, n).astype(np.float32))) for _ in range(count)]
            for m in (int(r) for r in args.rows.split(",")):
                x = jnp.asarray(rng.standard_normal((m, k), np.float32))
                runs = {name: kernel_bench.runner(fn, x, ws, "off" if name == "xla" else None) for name, fn in variants.items()}
                times = kernel_bench.alternate(runs, args.repeats, count)
                cols = []
                for name in runs:
                    t = statistics.median(times[name])
                    cols.append(f"{t * 1e3:8.3f} / {min(times[name]) * 1e3:6.3f} {m * n * k / t / 1e9:6.1f}")
                kern = statistics.median(times["kernel"])
                rs = " ".join(f"{statistics.median(times[r.split('/')[0]]) / kern:14.2f}" for r in ratios)
                print(f"{model:8} {f'{n}x{k}':>12} {m:>3} | {' | '.join(cols)} | {rs}", flush=True)
            del ws


if __name__ == "__main__":
    main()
