"""llama.cpp's own benchmark tools as a peer for benchmarks/compare.py: ``llama-bench`` (batch-1
decode and prompt processing) and ``llama-batched-bench`` (decode of several sequences at once),
built by ``../shared/tools/build-llama-cpp.sh`` for this CPU (pass its folder as ``--llama-dir``).

Rows have compare.py's fields: ``decode_tokens_per_s`` (llama-bench's ``tg`` after an empty
prompt at batch 1, or after `depth` tokens of context; llama-batched-bench's ``S_TG``, all sequences together, after a
`prompt_tokens`-token prompt each at batch > 1) and, at batch 1, ``ttft128_s`` (the prompt of
`ttft_tokens` tokens over llama-bench's ``pp`` rate: the time to encode it, as nx's TTFT figure
is the prompt program plus choosing one token).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any


def _run(cmd: list[str]) -> str:
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: {Path(cmd[0]).name} failed ({res.returncode}):\n{res.stderr[-2000:]}")
    return res.stdout


def bench(llama_dir: Path, gguf: Path, threads: int, new_tokens: int, ttft_tokens: int, repeats: int,
          depth: int = 0) -> dict[str, Any]:
    """Batch-1 decode tok/s (``tg``, after `depth` tokens of context: ``-d``) and the
    ``ttft_tokens`` prompt's encode time (from an empty cache) from llama-bench."""
    def run(*flags: str) -> list[dict[str, Any]]:
        return json.loads(_run([str(llama_dir / "llama-bench"), "-m", str(gguf), *flags, "-t", str(threads), "-r",
                                str(repeats), "-o", "json"]))

    if depth:
        out = run("-p", str(ttft_tokens), "-n", "0") + run("-p", "0", "-n", str(new_tokens), "-d", str(depth))
    else:
        out = run("-p", str(ttft_tokens), "-n", str(new_tokens))
    tg = next(r for r in out if r["n_gen"] > 0 and r["n_prompt"] == 0)
    pp = next(r for r in out if r["n_prompt"] > 0 and r["n_gen"] == 0)
    return {"decode_tokens_per_s": tg["avg_ts"], "all_decode_tokens_per_s": tg.get("samples_ts"),
            "ttft128_s": ttft_tokens / pp["avg_ts"], "prompt_tokens_per_s": pp["avg_ts"],
            "all_prompt_tokens_per_s": pp.get("samples_ts"),
            "build": out[0].get("build_commit"), "cpu_info": out[0].get("cpu_info")}


def batched(llama_dir: Path, gguf: Path, threads: int, prompt_tokens: int, new_tokens: int,
            batches: list[int]) -> dict[int, dict[str, Any]]:
    """Per batch size: aggregate decode tok/s of that many sequences (``S_TG``) from llama-batched-bench."""
    ctx = max(batches) * (prompt_tokens + new_tokens) + 64
    lines = _run([str(llama_dir / "llama-batched-bench"), "-m", str(gguf), "-c", str(ctx), "-npp", str(prompt_tokens),
                  "-ntg", str(new_tokens), "-npl", ",".join(map(str, batches)), "-t", str(threads), "-tb", str(threads),
                  "--output-format", "jsonl"])
    out = {}
    for line in lines.splitlines():
        if line.startswith("{") and '"speed_tg"' in line:
            r = json.loads(line)
            out[int(r["pl"])] = {"decode_tokens_per_s": r["speed_tg"], "prompt_tokens_per_s": r["speed_pp"]}
    return out
