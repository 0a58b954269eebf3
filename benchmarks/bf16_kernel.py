"""The bf16 kernel (nx-kernels-cpu) against XLA's bf16 dot on decode's matrix shapes.

For each weight shape ``[n, k]`` of SmolLM2-135M or the Llama-3.2-1B shape and each row count
``m``, one jitted program runs f32 ``x @ w.T`` over a list of distinct bf16 weights of that
shape (together >= ``--stream-mb``, so each weight streams from memory, as in decode), once through
the kernel (`nx_kernels_cpu.bf16_matmul`) and once through XLA's dot (`nx.ops.linear.project`
traced with ``NX_CPU_KERNELS=off``). The two are timed alternately (``--repeats`` rounds) and the
medians printed: ms per matrix, weight GB/s and GMAC/s.

``--out bf16`` (default) times products whose results are rounded to bf16, as ``amp="bf16"``'s layers
round them (the kernel as it stores, XLA in a convert after its dot); ``--out f32`` keeps f32 results
(lm heads, tensor-parallel partial sums). ``--threads N`` caps the kernels' threads (0: XLA's intra-op pool). ``--baseline LIB.so`` adds
another build of the kernel library (e.g. the one before a change, copied aside), registered under
its own FFI target and timed in the same rounds, with f32 results; ``--baseline-glu`` for a build
of nx-kernels-cpu 0.8 or later, whose handler takes the ``glu`` attribute.

    python benchmarks/bf16_kernel.py [--model smollm2,1b] [--rows 1,4,8,16] [--repeats 5] [--baseline SO]
    python benchmarks/bf16_kernel.py --rows 16,32,64,128,256,512,1024     # prompt chunks: the panels
"""

from __future__ import annotations

import argparse
import importlib
import statistics

import jax.numpy as jnp
import kernel_bench
import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2,1b")
    ap.add_argument("--rows", default="1,4,8,16")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--stream-mb", type=float, default=96.0, help="weight bytes per timed run (>= the LLC)")
    ap.add_argument("--threads", type=int, default=0, help="the kernels' threads (0: XLA's pool)")
    ap.add_argument("--baseline", default="", help="another libnx_kernels_cpu.so to time alongside")
    ap.add_argument("--baseline-glu", action="store_true", help="the baseline takes the glu attribute (0.8+)")
    ap.add_argument("--shapes", default="", help="only these n x k, e.g. 576x576,8192x2048")
    ap.add_argument("--out", default="bf16", choices=("bf16", "f32"), help="the products' result dtype")
    args = ap.parse_args()
    import nx_kernels_cpu

    linear = importlib.import_module("nx.ops.linear")
    out = jnp.bfloat16 if args.out == "bf16" else jnp.float32
    variants = {
        "kernel": lambda x, w: nx_kernels_cpu.bf16_matmul(x, w, threads=args.threads, dtype=out),
        "xla": lambda x, w: linear.project(x, w, out),
    }
    if args.baseline:
        attrs = {"glu": 0} if args.baseline_glu else {}
        other = kernel_bench.baseline(args.baseline, "NxBf16Matmul", 3, args.threads, **attrs)
        variants["baseline"] = lambda x, w: other(x, w, n=w.shape[0])
    only = {tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",") if s}
    rng = np.random.default_rng(0)
    print(f"isa {nx_kernels_cpu.isa()}, {args.out} results; ms per matrix, weight GB/s, GMAC/s; medians of {args.repeats}")
    head = " | ".join(f"{name + ' ms':>11} {'GB/s':>6} {'GMAC/s':>7}" for name in variants)
    print(f"{'model':8} {'n x k':>12} {'m':>3} | {head} | {'xla/kernel':>10}")
    for model in args.model.split(","):
        for n, k in kernel_bench.SHAPES[model]:
            if only and (n, k) not in only:
                continue
            count = max(1, int(np.ceil(args.stream_mb * 2**20 / (2 * n * k))))
            ws = [kernel_bench.weight(rng.standard_normal((n, k), np.float32).astype(jnp.bfloat16)) for _ in range(count)]
            for m in (int(r) for r in args.rows.split(",")):
                x = jnp.asarray(rng.standard_normal((m, k), np.float32), jnp.bfloat16)
                runs = {name: kernel_bench.runner(fn, x, ws, "off" if name == "xla" else None) for name, fn in variants.items()}
                times = kernel_bench.alternate(runs, args.repeats, count)
                cols = []
                for name in runs:
                    t = statistics.median(times[name])
                    cols.append(f"{t * 1e3:11.3f} {2 * n * k / t / 1e9:6.1f} {m * n * k / t / 1e9:7.1f}")
                ratio = statistics.median(times["xla"]) / statistics.median(times["kernel"])
                print(f"{model:8} {f'{n}x{k}':>12} {m:>3} | {' | '.join(cols)} | {ratio:10.2f}", flush=True)
            del ws


if __name__ == "__main__":
    main()
