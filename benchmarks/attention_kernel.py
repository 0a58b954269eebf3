"""Microbenchmark of nx-kernels-cpu's decode attention kernel at a model's decode shapes, its caches
streaming from memory as in a decode step (one distinct cache per layer).

    python benchmarks/attention_kernel.py [--model smollm2|1b] [--batch 1,8] [--window 128,512]
        [--filled 1.0] [--positions 2048] [--bf16] [--repeats 7] [--threads 0]

Prints one line per (batch, window): median and best ms of a step's calls (one per layer, each on
its own cache) and the GB/s of the live keys and values read (`--filled` of the window, the rest
masked, as a decode window that a shape bucket rounds up). Runs with whatever nx-kernels-cpu the
interpreter imports, so the same script measures two builds A/B.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

# layers, kv heads, query heads per kv head, head dim
MODELS = {"smollm2": (30, 3, 3, 64), "1b": (16, 8, 4, 64)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=sorted(MODELS))
    ap.add_argument("--batch", default="1,8")
    ap.add_argument("--window", default="128,512")
    ap.add_argument("--filled", type=float, default=1.0, help="fraction of the window the masks allow")
    ap.add_argument("--positions", type=int, default=0, help="cache positions P (default: the window)")
    ap.add_argument("--bf16", action="store_true", help="bf16 caches")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    import nx_kernels_cpu

    layers, heads, group, dim = MODELS[args.model]
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    rng = np.random.default_rng(0)

    def cache(shape):  # bf16 as its uint16 bits, as nx's caches pass them (no copy in the call)
        c = jnp.asarray(rng.standard_normal(shape), dtype)
        return jax.lax.bitcast_convert_type(c, jnp.uint16) if args.bf16 else c

    f = jax.jit(lambda q, k, v, m: nx_kernels_cpu.decode_attention(q, k, v, m, scale=dim ** -0.5,
                                                                   threads=args.threads))
    for batch in (int(b) for b in args.batch.split(",")):
        for window in (int(w) for w in args.window.split(",")):
            positions = max(args.positions, window)
            rows = heads * batch
            live = max(1, int(window * args.filled))
            mask = jnp.asarray(np.arange(window)[None, None, :] < live).repeat(batch, 0)
            q = jnp.asarray(rng.standard_normal((rows, group, dim)), jnp.float32)
            caches = [(cache((rows, dim, positions)), cache((rows, positions, dim))) for _ in range(layers)]
            for k, v in caches:
                jax.block_until_ready(f(q, k, v, mask))
            times = []
            for _ in range(args.repeats):
                t = time.perf_counter()
                for k, v in caches:
                    jax.block_until_ready(f(q, k, v, mask))
                times.append(time.perf_counter() - t)
            best = min(times)
            gb = layers * 2 * rows * live * dim * (2 if args.bf16 else 4) / 1e9
            print(f"{args.model} batch {batch} window {window:5d} live {live:5d} P {positions:5d}: "
                  f"median {statistics.median(times) * 1e3:7.3f} ms, best {best * 1e3:7.3f} ms "
                  f"{gb / best:6.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
