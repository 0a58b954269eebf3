"""nx on a CUDA GPU against Hugging Face transformers on the same GPU, same weights, plus the HBM
roofline.

No weights can be downloaded on the GPU machine, so the models are random-weight Llama checkpoints
with the real shapes of SmolLM2-135M and Llama-3.2-1B, written once as bf16 safetensors and read by
both engines (decode speed does not depend on the values; EOS is banned so every run does the
same work). For each model, dtype and batch size:

- **nx** ``backend="cuda"``: cold compile of the programs it needs, decode tokens/s (``stream``,
  one host sync per token), per-step latency p50/p99, time to first token of a 128-token prompt;
- **HF transformers** eager PyTorch on the GPU (default attention, no ``torch.compile``),
  ``generate(do_sample=False, min_new_tokens=max_new_tokens)`` timed per token by a streamer;
- the **HBM roofline**: a jitted sum streaming a multi-GB array (read bandwidth), so
  tokens/s <= bandwidth / bytes read per token.

    python benchmarks/gpu.py                        # on a machine with an NVIDIA GPU and jax[cuda]
    python benchmarks/gpu.py --backend cpu --models tiny --dtypes f32 --new-tokens 8   # a dry run
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")  # leave GPU memory for PyTorch too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import hf_generate_timer, load_and_compile, log, measure, measure_ttft, nx_row  # noqa: E402

from nx import bench as nx_bench  # noqa: E402

ROOT = Path(__file__).resolve().parent
TORCH_DTYPES = {"f32": "float32", "bf16": "bfloat16"}
# Real shapes (random weights): HF LlamaConfig fields.
MODELS: dict[str, dict[str, Any]] = {
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, vocab_size=49152, rope_theta=100000.0, rms_norm_eps=1e-5,
                         tie_word_embeddings=True, max_position_embeddings=8192),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0,
                         rms_norm_eps=1e-5, tie_word_embeddings=True, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True, max_position_embeddings=512),
}


def hbm_probe(backend: str, gb: float, reps: int = 10) -> dict[str, Any]:
    """Best-of-`reps` read bandwidth of a jitted f32 sum over a `gb`-GB device array."""
    import jax
    import jax.numpy as jnp

    dev = jax.devices(backend)[0]
    x = jax.device_put(jnp.ones((int(gb * 1e9) // 4,), jnp.float32), dev)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        total(x).block_until_ready()
        times.append(time.perf_counter() - t0)
    out = {"device": dev.device_kind, "array_bytes": x.nbytes, "read_gbs": x.nbytes / min(times) / 1e9}
    del x
    return out


def write_checkpoint(name: str, directory: Path, device: str) -> Path:
    """A random-weight Llama with `MODELS[name]`'s shape, saved as bf16 safetensors (kept if already
    in `directory`, so several runs share one)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = directory / name
    if (path / "config.json").exists():
        return path
    cfg = LlamaConfig(**MODELS[name], bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.save_pretrained(path)
    del model
    return path


def run_nx(path: Path, name: str, dtype: str, args) -> list[dict[str, Any]]:
    import nx

    rows = []
    for b in args.batch_sizes:
        for k in args.decode_steps:
            log(f"nx {name} {dtype}: batch {b}, decode_steps {k}: load + compile")
            model, times = load_and_compile(lambda b=b, k=k: nx.load(
                "llama", path, batch_size=b, n_positions=args.n_positions, amp=dtype, backend=args.backend,
                context_length_estimate=args.context_buckets, compile=False, progress=False, quant="f32",
                decode_steps=k))
            vocab = model.spec.vocab_size
            ids128 = nx_bench.random_prompt(vocab, 1, args.ttft_prompt_tokens, seed=128) if b == 1 else None
            row = nx_row(model, nx_bench.random_prompt(vocab, b, args.prompt_tokens, seed=b), ids128, args)
            row.update(engine="nx", model=name, precision=dtype, batch=b, steps_per_call=k, **times,
                       n_programs=len(model.program_shapes()), xla_flags=os.environ.get("XLA_FLAGS", ""))
            rows.append(row)
            del model
    return rows


def run_hf(path: Path, name: str, dtype: str, args) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    device = "cuda" if args.backend == "cuda" else "cpu"
    log(f"hf {name} {dtype}: load")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, TORCH_DTYPES[dtype])).to(device).eval()
    load_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    vocab = model.config.vocab_size

    generate = hf_generate_timer(model, 0, device)

    rows = []
    for b in args.batch_sizes:
        log(f"hf {name} {dtype}: batch {b}: decode")
        ids = nx_bench.random_prompt(vocab, b, args.prompt_tokens, seed=b)
        row = measure(lambda warmup, ids=ids: generate(ids, 2 if warmup else args.new_tokens), args.repeats)
        row.update(engine="hf", model=name, precision=dtype, batch=b, load_s=load_s, weight_bytes=weights,
                   bytes_per_token=weights / b, attn_implementation=getattr(model.config, "_attn_implementation", None))
        if b == 1:
            ids128 = nx_bench.random_prompt(vocab, 1, args.ttft_prompt_tokens, seed=128)
            row.update(measure_ttft(lambda x=ids128: generate(x, 1).ttft_s, args.repeats))
        rows.append(row)
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def print_report(result: dict[str, Any]) -> None:
    hbm = result["hbm"]
    print(f"device: {hbm['device']}; HBM read probe {hbm['read_gbs']:.0f} GB/s ({hbm['array_bytes'] / 1e9:.1f} GB sum)")
    print(f"{'model':<14} {'engine':<6} {'prec':<5} {'batch':>5} {'k':>3} {'decode tok/s':>12} {'p50 ms':>7} {'p99 ms':>7} "
          f"{'TTFT128 ms':>10} {'MB/token':>9} {'GB/s':>7} {'% roof':>6} {'compile s':>9}")
    for r in result["rows"]:
        ttft = f"{r['ttft128_s'] * 1e3:>10.1f}" if "ttft128_s" in r else f"{'':>10}"
        comp = f"{r['compile_s']:>9.1f}" if "compile_s" in r else f"{'':>9}"
        print(f"{r['model']:<14} {r['engine']:<6} {r['precision']:<5} {r['batch']:>5} {r.get('steps_per_call', ''):>3} "
              f"{r['decode_tokens_per_s']:>12.1f} "
              f"{r['latency_p50_ms']:>7.2f} {r['latency_p99_ms']:>7.2f} {ttft} {r['bytes_per_token'] / 1e6:>9.1f} "
              f"{r['achieved_gbs']:>7.1f} {100 * r['fraction_of_roofline']:>6.1f} {comp}")
    print("\nratios nx / HF (tok/s: > 1 is better; TTFT: < 1 is better):")
    for q in result["ratios"]:
        print(f"  {q['model']:<14} {q['precision']:<5} batch {q['batch']:<2} k {q['steps_per_call']:<2} {q['metric']:<20} "
              f"{q['ratio']:>6.2f}x")


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for mine in (r for r in rows if r["engine"] == "nx"):
        for peer in rows:
            same = (peer["model"], peer["precision"], peer["batch"]) == (mine["model"], mine["precision"], mine["batch"])
            if peer["engine"] != "hf" or not same:
                continue
            for m in ("decode_tokens_per_s", "ttft128_s", "latency_p50_ms"):
                if m in mine and m in peer and peer[m]:
                    out.append({"model": mine["model"], "precision": mine["precision"], "batch": mine["batch"],
                                "steps_per_call": mine["steps_per_call"], "metric": m, "nx": mine[m], "hf": peer[m], "ratio": mine[m] / peer[m]})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--backend", default="cuda")
    ap.add_argument("--models", default="smollm2-135m,llama-3.2-1b", help=f"comma list of {sorted(MODELS)}")
    ap.add_argument("--dtypes", default="bf16,f32")
    ap.add_argument("--engines", default="nx,hf")
    ap.add_argument("--batch-sizes", default="1,8")
    ap.add_argument("--prompt-tokens", type=int, default=16)
    ap.add_argument("--ttft-prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--n-positions", type=int, default=256)
    ap.add_argument("--context-buckets", default="32,128", help="nx prompt buckets (the prompts' own sizes)")
    ap.add_argument("--decode-steps", default="1", help="comma list: nx decode steps per program call (one row each)")
    ap.add_argument("--checkpoints", type=Path, default=None,
                    help="folder to keep the random-weight checkpoints in and reuse (default: a temporary one)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--hbm-gb", type=float, default=4.0)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "gpu.json")
    args = ap.parse_args(argv)
    args.models = [m for m in args.models.split(",") if m]
    args.dtypes = [d for d in args.dtypes.split(",") if d]
    args.engines = [e for e in args.engines.split(",") if e]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b]
    args.decode_steps = [int(k) for k in args.decode_steps.split(",") if k]
    args.context_buckets = [int(c) for c in args.context_buckets.split(",") if c]
    if set(args.models) - set(MODELS) or set(args.dtypes) - set(TORCH_DTYPES) or set(args.engines) - {"nx", "hf"}:
        ap.error(f"models from {sorted(MODELS)}, dtypes from {sorted(TORCH_DTYPES)}, engines from nx,hf")
    if args.prompt_tokens + args.new_tokens > args.n_positions or args.ttft_prompt_tokens >= args.n_positions:
        ap.error("prompts plus new tokens must fit --n-positions")

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    result: dict[str, Any] = {"machine": nx_bench.machine_info(), "settings": {
        k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    try:
        import torch

        result["machine"]["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:  # noqa: BLE001 - only for the record
        result["machine"]["gpu"] = repr(exc)
    log(f"HBM probe ({args.hbm_gb} GB)")
    result["hbm"] = hbm_probe(args.backend, args.hbm_gb)
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="nx-gpu-bench-") as tmp:
        for name in args.models:
            log(f"writing random-weight {name} checkpoint")
            path = write_checkpoint(name, args.checkpoints or Path(tmp), "cuda" if args.backend == "cuda" else "cpu")
            for dtype in args.dtypes:
                if "nx" in args.engines:
                    rows += run_nx(path, name, dtype, args)
                if "hf" in args.engines:
                    rows += run_hf(path, name, dtype, args)
                args.out.parent.mkdir(parents=True, exist_ok=True)  # partial results survive a time limit
                args.out.write_text(json.dumps({**result, "rows": rows}, indent=2, default=str) + "\n")
    for r in rows:
        r["achieved_gbs"] = r["bytes_per_token"] * r["decode_tokens_per_s"] / 1e9
        r["fraction_of_roofline"] = r["achieved_gbs"] / result["hbm"]["read_gbs"]
    result["rows"] = rows
    result["ratios"] = ratios(rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_report(result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
