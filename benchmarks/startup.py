"""Start-up benchmark: process start to first token, `nx generate` against `llama-cli`, same GGUF,
same chat prompt, in one run; and how fast a saved artifact loads.

    python benchmarks/startup.py --llama-dir ~/.cache/nx-llama.cpp/0.3.36 [--runs 5]

Warm runs only (each tool runs once before timing, so files are in the page cache and nx's
compile cache holds the programs, config and tokenizer). Measured per run, from before the
process is spawned:

- ``nx generate llama SmolLM2.gguf --chat -p PROMPT -n 16``: the first byte on stdout (nx prints
  only the answer there) is the first token; the stderr summary gives nx's own split (load,
  programs, first token);
- ``llama-cli -m SmolLM2.gguf -p PROMPT -n 16 -st --temp 0 -t 2``: the first byte after the echoed
  ``> PROMPT`` line is the first token;
- an artifact (``nx compile`` of the same GGUF): ``nx.load(dir)`` in a fresh interpreter, timed
  from before ``import nx`` (and without it), and ``nx generate DIR`` to its first token;
- ``python -X importtime`` of one warm ``nx generate``: where import time goes, by top-level
  package.

Results go to a JSON file and a markdown table (BENCHMARKS.md "Start-up").
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CACHE_SETTING = os.environ.get("NX_CACHE_DIR")
sys.path.insert(0, str(Path(__file__).resolve().parent))
from compare import smollm2_gguf  # noqa: E402

# compare.py turns nx's compile cache off for its cold-compile timings; warm start-up needs it
if _CACHE_SETTING is None:
    os.environ.pop("NX_CACHE_DIR", None)
else:
    os.environ["NX_CACHE_DIR"] = _CACHE_SETTING

PROMPT = "What is the capital of France?"
NEW_TOKENS = 16
NX_FLAGS = ["--n-positions", "512", "--context-length-estimate", "64,256"]


def log(msg: str) -> None:
    print(f"[startup-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def first_output(cmd: list[str], after: bytes = b"", timeout: float = 300) -> dict:
    """Run `cmd`; seconds from spawn to its first stdout byte after `after` (and to exit), its
    stdout and stderr."""
    with tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
        out, first = b"", None
        while True:
            chunk = os.read(proc.stdout.fileno(), 4096)
            if not chunk:
                break
            out += chunk
            if first is None:
                at = out.find(after) if after else 0
                if at >= 0 and len(out) > at + len(after):
                    first = time.perf_counter() - t0
            if time.perf_counter() - t0 > timeout:
                proc.kill()
                break
        proc.wait()
        total = time.perf_counter() - t0
        err.seek(0)
        stderr = err.read().decode(errors="replace")
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {stderr[-2000:]}")
    return {"first_s": first, "total_s": total, "stdout": out.decode(errors="replace"), "stderr": stderr}


def nx_summary(stderr: str) -> dict:
    """The fields of `nx generate`'s ``[load 1.2s | ... | first token 150 ms | ...]`` line."""
    line = next((ln for ln in stderr.splitlines() if ln.startswith("[load ")), "")
    out = {}
    if m := re.search(r"load ([\d.]+)s", line):
        out["load_s"] = float(m.group(1))
    if m := re.search(r"\| (?:compile|load) (\d+) (?:saved )?programs? ([\d.]+)s", line):
        out["programs"], out["programs_s"] = int(m.group(1)), float(m.group(2))
    if m := re.search(r"first token (\d+) ms", line):
        out["first_token_ms"] = int(m.group(1))
    return out


def median(runs: list[dict], key: str) -> float | None:
    values = [r[key] for r in runs if r.get(key) is not None]
    return statistics.median(values) if values else None


def import_profile(cmd: list[str]) -> list[tuple[str, float]]:
    """Seconds of import per top-level package while `cmd` (a python -m command) runs."""
    res = subprocess.run([sys.executable, "-X", "importtime", *cmd], capture_output=True, text=True, check=True)
    totals: dict[str, float] = {}
    for line in res.stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+\d+ \|(\s*)(\S+)", line)
        if m:  # self time, summed per top-level package
            top = m.group(3).split(".")[0]
            totals[top] = totals.get(top, 0.0) + int(m.group(1)) / 1e6
    return sorted(totals.items(), key=lambda kv: -kv[1])


#: where one warm `nx generate` spends its time: (label, cProfile function pattern), cumulative
PHASES = (
    ("import jax", r"jax/__init__.py:\d+\(<module>\)"),
    ("open the GGUF (metadata, config)", r"nx/checkpoint.py:\d+\(open_checkpoint\)"),
    ("read and dequantize weights", r"nx/params.py:\d+\(build_params\)"),
    ("place weights, allocate KV cache", r"nx/model.py:\d+\(__init__\)"),
    ("tokenizer (cached conversion)", r"nx/model.py:\d+\(tokenizer\)"),
    ("load 2 programs (compile cache)", r"nx/model.py:\d+\(compile\)"),
    ("prompt and 16 decode steps", r"nx/decoding.py:\d+\(steps\)"),
)


def phase_profile(cmd: list[str]) -> list[tuple[str, float]]:
    """Cumulative seconds of each of `PHASES` in one cProfile'd run of `cmd` (a python -m command)."""
    import pstats

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "prof"
        subprocess.run([sys.executable, "-m", "cProfile", "-o", str(out), *cmd], check=True, capture_output=True)
        stats = pstats.Stats(str(out)).stats  # (file, line, name) -> (cc, nc, tt, ct, callers)
        total = max(v[3] for v in stats.values())
        found = [("whole run (under the profiler)", total)]
        for label, pattern in PHASES:
            hits = [v[3] for (f, line, name), v in stats.items() if re.search(pattern, f"{f}:{line}({name})")]
            found.append((label, max(hits, default=0.0)))
    return found


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-dir", type=Path, default=None, help="folder with llama-cli (build-llama-cpp.sh)")
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / f"startup-{time.strftime('%Y%m%d')}.json")
    args = ap.parse_args()
    gguf = smollm2_gguf()
    nx_bin = shutil.which("nx") or "nx"
    nx_cmd = [nx_bin, "generate", "llama", str(gguf), "--chat", "-p", PROMPT, "-n", str(NEW_TOKENS), *NX_FLAGS]
    result: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "gguf": gguf.name, "runs": args.runs}

    log("nx generate (one run to warm the caches)")
    first_output(nx_cmd)
    runs = []
    for i in range(args.runs):
        r = first_output(nx_cmd)
        runs.append({"first_s": r["first_s"], "total_s": r["total_s"], **nx_summary(r["stderr"])})
        log(f"nx generate run {i + 1}: first token {r['first_s']:.2f} s, exit {r['total_s']:.2f} s")
    result["nx_generate"] = runs

    if args.llama_dir:
        cli = [str(args.llama_dir / "llama-cli"), "-m", str(gguf), "-p", PROMPT, "-n", str(NEW_TOKENS), "-st",
               "--temp", "0", "-t", "2", "--simple-io"]
        first_output(cli, after=f"> {PROMPT}\n".encode())
        runs = []
        for i in range(args.runs):
            r = first_output(cli, after=f"> {PROMPT}\n".encode())
            runs.append({"first_s": r["first_s"], "total_s": r["total_s"]})
            log(f"llama-cli run {i + 1}: first token {r['first_s']:.2f} s, exit {r['total_s']:.2f} s")
        result["llama_cli"] = runs

    with tempfile.TemporaryDirectory() as tmp:
        art = Path(tmp) / "smollm2"
        log("nx compile (the artifact)")
        subprocess.run([nx_bin, "compile", "llama", str(gguf), "--out", str(art), *NX_FLAGS, "-q"], check=True)
        probe = ("import time; t0 = time.perf_counter(); import nx; t1 = time.perf_counter(); "
                 f"m = nx.load({str(art)!r}); t2 = time.perf_counter(); m.compile(progress=False); "
                 "t3 = time.perf_counter(); print(t2 - t0, t2 - t1, t3 - t1)")
        subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True)
        loads, gens = [], []
        for i in range(args.runs):
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True, text=True).stdout
            with_import, load_only, all_programs = (float(x) for x in out.split())
            loads.append({"process_s": time.perf_counter() - t0, "import_and_load_s": with_import, "load_s": load_only,
                          "load_all_programs_s": all_programs})
            r = first_output([nx_bin, "generate", str(art), "--chat", "-p", PROMPT, "-n", str(NEW_TOKENS)])
            gens.append({"first_s": r["first_s"], "total_s": r["total_s"], **nx_summary(r["stderr"])})
            log(f"artifact run {i + 1}: nx.load {load_only:.2f} s (with import {with_import:.2f} s), "
                f"nx generate first token {r['first_s']:.2f} s")
        result["artifact_load"], result["artifact_generate"] = loads, gens

    result["imports"] = import_profile(["-m", "nx.cli", *nx_cmd[1:], "-q"])[:12]
    result["phases"] = phase_profile(["-m", "nx.cli", *nx_cmd[1:], "-q"])
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    log(f"wrote {args.out}")
    print(markdown(result))


def markdown(r: dict) -> str:
    rows = ["| what | median first token (s) | median exit (s) | nx's own split (median) |", "| --- | ---: | ---: | --- |"]

    def split(runs: list[dict]) -> str:
        parts = []
        if (v := median(runs, "load_s")) is not None:
            parts.append(f"load {v:.2f} s")
        if (v := median(runs, "programs_s")) is not None:
            parts.append(f"programs {v:.2f} s")
        if (v := median(runs, "first_token_ms")) is not None:
            parts.append(f"first token {v:.0f} ms")
        return ", ".join(parts)

    for name, key in (("nx generate (GGUF)", "nx_generate"), ("llama-cli (same GGUF)", "llama_cli"),
                      ("nx generate (artifact)", "artifact_generate")):
        if key in r:
            rows.append(f"| {name} | {median(r[key], 'first_s'):.2f} | {median(r[key], 'total_s'):.2f} | {split(r[key])} |")
    if "llama_cli" in r:
        ratio = median(r["nx_generate"], "first_s") / median(r["llama_cli"], "first_s")
        rows.append(f"\nnx / llama-cli, first token: {ratio:.2f}x")
    if "artifact_load" in r:
        a = r["artifact_load"]
        rows.append(f"\nartifact: nx.load {median(a, 'load_s'):.2f} s (median; its programs then load in the background), "
                    f"{median(a, 'import_and_load_s'):.2f} s with `import nx`, {median(a, 'load_all_programs_s'):.2f} s "
                    f"until every program is loaded, {median(a, 'process_s'):.2f} s as a whole python process")
    rows.append("\nimport time by package (s): " + ", ".join(f"{k} {v:.2f}" for k, v in r["imports"][:8]))
    rows.append("\none warm nx generate under cProfile (cumulative s): "
                + ", ".join(f"{k} {v:.2f}" for k, v in r.get("phases", [])))
    return "\n".join(rows)


if __name__ == "__main__":
    main()
