"""nx-kernels-cpu's f32 decode kernel against XLA's f32 dot: weight-streaming GB/s per matmul shape.

Each case is ``nx.ops.linear.project(x [m, k], w [n, k])`` as nx runs it, traced once with the kernel
(``NX_CPU_KERNELS=auto``) and once on XLA's dots (``off``); rows nx keeps on XLA's dots (below
``F32_MIN_ROWS``, above ``F32_MAX_ROWS``) call ``nx_kernels_cpu.f32_matmul`` directly. One timed
call chains the product over enough distinct copies of the weight (>= ``--min-mb`` MB together, at most 64) that they stream
from memory, as decode's weights do; each chained x depends on the previous product so the calls run one
after another. Kernel and XLA calls alternate (``--repeats`` each) so machine noise hits both alike;
the figure is the median. GB/s counts the weight bytes only.

    python benchmarks/f32_kernel.py [--model smollm2|1b|both] [--rows 1,2,4,8,16] [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import kernel_bench
import numpy as np


def chain(project, copies):
    import jax
    import jax.numpy as jnp

    def run(x, ws):
        for w in ws:
            y = project(x, w, jnp.float32)
            x = x + 1e-30 * y[:, :1]  # the next product waits for this one
        return x

    return jax.jit(run)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=["smollm2", "1b", "both"], default="both")
    ap.add_argument("--rows", default="1,2,4,8,16")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--min-mb", type=float, default=128.0)
    ap.add_argument("--shapes", default="", help="only these n x k, e.g. 576x576,49152x576")
    ap.add_argument("--stat", choices=["median", "min"], default="median")
    args = ap.parse_args()

    import jax
    import jax.numpy as jnp

    from nx.ops import cpu_kernels
    from nx.ops.linear import project

    def direct(x, w, dtype):  # rows nx keeps on XLA's dots (outside F32_MIN_ROWS..F32_MAX_ROWS): the kernel
        import nx_kernels_cpu

        return nx_kernels_cpu.f32_matmul(x, w)

    print(f"kernels: {cpu_kernels.describe()}; jax {jax.__version__}; load {os.getloadavg()[0]:.1f}")
    rng = np.random.default_rng(0)
    models = ["smollm2", "1b"] if args.model == "both" else [args.model]
    print("| model | n x k | m | kernel GB/s | XLA GB/s | kernel / XLA |")
    print("| --- | --- | ---: | ---: | ---: | ---: |")
    for model in models:
        for n, k in kernel_bench.SHAPES[model]:
            if args.shapes and f"{n}x{k}" not in args.shapes.split(","):
                continue
            nbytes = 4 * n * k
            copies = int(min(64, max(1, np.ceil(args.min_mb * 1e6 / nbytes))))
            ws = [kernel_bench.weight(rng.standard_normal((n, k), np.float32) * 0.02) for _ in range(copies)]
            for m in [int(r) for r in args.rows.split(",")]:
                x = jnp.asarray(rng.standard_normal((m, k), np.float32))
                fns = {}
                for name, env in (("kernel", "auto"), ("xla", "off")):
                    os.environ[cpu_kernels.ENV] = env
                    inside = cpu_kernels.F32_MIN_ROWS <= m <= cpu_kernels.F32_MAX_ROWS
                    f = direct if name == "kernel" and not inside else project
                    fns[name] = chain(f, copies).lower(x, ws).compile()
                    fns[name](x, ws).block_until_ready()  # warm
                os.environ.pop(cpu_kernels.ENV)
                times = {name: [] for name in fns}
                for _ in range(args.repeats):
                    for name, f in fns.items():
                        t0 = time.perf_counter()
                        f(x, ws).block_until_ready()
                        times[name].append(time.perf_counter() - t0)
                stat = statistics.median if args.stat == "median" else min
                gbs = {name: copies * nbytes / stat(t) / 1e9 for name, t in times.items()}
                print(f"| {model} | {n}x{k} | {m} | {gbs['kernel']:.1f} | {gbs['xla']:.1f} | "
                      f"{gbs['kernel'] / gbs['xla']:.2f} |", flush=True)
            del ws
    print(f"load {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
