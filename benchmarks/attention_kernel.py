"""Microbenchmark of nx-kernels-cpu's attention kernels at a model's shapes, its caches streaming
from memory as in a program call (one distinct cache per layer).

    python benchmarks/attention_kernel.py [--model smollm2|1b] [--batch 1,8] [--window 128,512]
        [--filled 1.0] [--positions 2048] [--bf16] [--repeats 7] [--threads 0] [--prompt 0]

Decode (the default): one line per (batch, window): median and best ms of a step's calls (one per
layer, each on its own cache) and the GB/s of the live keys and values read (`--filled` of the
window, the rest masked, as a decode window that a shape bucket rounds up).

``--prompt T``: the prompt kernel on a causal chunk of T tokens at the window's end (the first
``(1 - filled) * window`` positions a left padding), against XLA's path (`nx.ops.attention.attend`
on the same caches) in the same run: ms of all layers' calls for each, and their ratio.

Runs with whatever nx-kernels-cpu the interpreter imports, so the same script measures two builds A/B.
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
    ap.add_argument("--prompt", type=int, default=0, help="tokens of a prompt chunk (0: decode)")
    args = ap.parse_args()
    if args.prompt:
        return prompt(args)
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


def _timed(f, args_per_layer, repeats):
    for a in args_per_layer:
        jax.block_until_ready(f(*a))
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for a in args_per_layer:
            jax.block_until_ready(f(*a))
        times.append(time.perf_counter() - t)
    return statistics.median(times), min(times)


def prompt(args) -> None:
    """The prompt kernel against XLA's `attend` (see the module docstring)."""
    import nx_kernels_cpu

    from nx.ops import attention

    layers, heads, group, dim = MODELS[args.model]
    dtype = jnp.bfloat16 if args.bf16 else jnp.float32
    rng = np.random.default_rng(0)
    t = args.prompt
    for batch in (int(b) for b in args.batch.split(",")):
        for window in (int(w) for w in args.window.split(",")):
            if window < t:
                continue
            rows = heads * batch
            slot = jnp.full((batch,), window - t, jnp.int32)
            pad = jnp.full((batch,), int(window * (1 - args.filled)), jnp.int32)
            mask = attention.causal_padding_mask(slot, pad, t, window)
            q = jnp.asarray(rng.standard_normal((batch, t, heads * group, dim)), dtype)
            caches = [(jnp.asarray(rng.standard_normal((rows, dim, window)), dtype),
                       jnp.asarray(rng.standard_normal((rows, window, dim)), dtype)) for _ in range(layers)]
            bits = [tuple(jax.lax.bitcast_convert_type(c, jnp.uint16) if args.bf16 else c for c in kv) for kv in caches]

            def kernel(q, k, v, m, batch=batch, rows=rows):
                qr = q.reshape(batch, t, heads, group, dim).transpose(2, 0, 3, 1, 4).reshape(rows, group * t, dim)
                o = nx_kernels_cpu.prompt_attention(qr, k, v, m, scale=dim ** -0.5, threads=args.threads)
                o = o.reshape(heads, batch, group, t, dim).transpose(1, 3, 0, 2, 4)
                return o.reshape(batch, t, heads * group * dim).astype(dtype)

            xla = jax.jit(lambda q, k, v, m: attention.attend(q, k, v, m, dim ** -0.5))
            km, kb = _timed(jax.jit(kernel), [(q, k, v, mask) for k, v in bits], args.repeats)
            xm, xb = _timed(xla, [(q, k, v, mask) for k, v in caches], args.repeats)
            print(f"{args.model} batch {batch} prompt {t:5d} window {window:5d} pad {int(pad[0]):5d}: kernel median "
                  f"{km * 1e3:8.2f} best {kb * 1e3:8.2f} ms; XLA median {xm * 1e3:8.2f} best {xb * 1e3:8.2f} ms; "
                  f"XLA / kernel {xm / km:5.2f}", flush=True)


if __name__ == "__main__":
    main()
