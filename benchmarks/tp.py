"""Decode tokens/s against tensor-parallel degree on this machine's CPU.

SmolLM2-135M has 9 attention heads and 3 kv heads, so its valid degrees are 1, 3 and 9; a
synthetic llama of the same size class with 8 heads / 2 kv heads (random weights, built here,
nothing downloaded) covers tp = 1, 2, 4. On one CPU socket, the "devices" share the same cores
and memory bandwidth, so TP shows its cost (collectives) rather than a speed-up; on a single GPU it
cannot speed anything up either. Real gains need separate accelerators.

    python benchmarks/tp.py [--new-tokens 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
os.environ["NX_CACHE_DIR"] = "off"  # compiles here are timed cold, never loaded from the compile cache


def decode_rate(model, prompt_len: int, new_tokens: int) -> float:
    import numpy as np

    ids = np.arange(1, prompt_len + 1)[None] % model.spec.vocab_size
    model.generate(ids, max_new_tokens=4, eos_token_id=[])  # warm up every program on the path
    out = model.generate(ids, max_new_tokens=new_tokens, eos_token_id=[], return_dict=True)
    t = out.timings
    return (t["new_tokens"] - 1) / (t["total_s"] - t["first_token_s"])


def synthetic_llama(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                      num_attention_heads=8, num_key_value_heads=2, head_dim=72, tie_word_embeddings=True)
    LlamaForCausalLM(cfg).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import nx

    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))
    from test_smollm2 import smollm2_gguf

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        synthetic_llama(tmp)
        targets = [("synthetic-llama-8h", tmp, (1, 2, 4))]
        gguf = smollm2_gguf()
        if gguf:
            targets.append(("SmolLM2-135M", str(gguf), (1, 3)))
        for name, path, degrees in targets:
            for tp in degrees:
                t0 = time.perf_counter()
                m = nx.load("llama", path, tp_degree=tp, n_positions=[256], context_length_estimate=[32], progress=False,
                            quant="f32")
                load_s = time.perf_counter() - t0
                rate = decode_rate(m, 20, args.new_tokens)
                rows.append({"model": name, "tp": tp, "decode_tokens_per_s": rate, "load_compile_s": load_s})
                print(f"{name:22s} tp={tp}  decode {rate:7.1f} tok/s   load+compile {load_s:5.1f} s", flush=True)
                del m
    base = {r["model"]: r["decode_tokens_per_s"] for r in rows if r["tp"] == 1}
    for r in rows:
        r["ratio_to_tp1"] = r["decode_tokens_per_s"] / base[r["model"]]
        print(f"{r['model']:22s} tp={r['tp']}  {r['ratio_to_tp1']:.2f}x tp=1")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
