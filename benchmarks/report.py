"""Render `compare.py`'s JSON into BENCHMARKS.md (tables, targets, machine, versions, commands).

    python benchmarks/report.py [benchmarks/results/compare.json] [--out BENCHMARKS.md] [--note TEXT]

Only the block between the BEGIN/END markers below is rewritten; anything else in the file (other
benchmarks' sections) is kept. A file without the markers gets the block after its title. A run
whose 1-minute load average exceeded the core count (+0.5; the benchmark itself keeps the cores
busy) is marked as contended.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent
#: One generated block per results file (SmolLM2's compare.json, the 1B shape's compare-1b.json ...).
BEGIN = "<!-- BEGIN benchmarks/report.py: generated from benchmarks/results/{name}; edit outside -->"
END = "<!-- END benchmarks/report.py{suffix} -->"
TITLES = {"smollm2": "SmolLM2-135M-Instruct", "1b": "Llama-3.2-1B shape (random weights)"}
COMMANDS = """\
```bash
. .venv/bin/activate
pip install -c constraints.txt -e './core[bench]'   # llama-cpp-python (builds llama.cpp) + matplotlib
python benchmarks/compare.py --llama-dir ~/.cache/nx-llama.cpp/0.3.36 --passes 2   # nx, HF eager, llama.cpp's tools + probes + nx bench
python benchmarks/compare.py --llama-dir ~/.cache/nx-llama.cpp/0.3.36 --shape 1b --engines nx,llama-tools \\
    --new-tokens 32 --repeats 2 --passes 2 --no-nx-bench --out benchmarks/results/compare-1b.json
python benchmarks/chart.py            # benchmarks/results/decode.png
python benchmarks/report.py           # this file
```"""


def fmt(x, spec=".1f", scale=1.0) -> str:
    return "-" if x is None else format(x * scale, spec)


def loadavg(values) -> str:
    return "-" if not values else " / ".join(f"{x:.2f}" for x in values)


#: llama.cpp's precision each nx precision is compared with (as compare.py's PEER_PRECISION)
PEER_PRECISION = {"f32": "f32", "bf16": "bf16", "s8": "q8_0", "s4": "q4_0", "q8_0": "q8_0", "q4_0": "q4_0"}


def peer_row(rows: list[dict], r: dict) -> dict | None:
    """The llama.cpp row an nx row is compared with: its peer precision, same batch."""
    if r["engine"] != "nx":
        return None
    want = PEER_PRECISION.get(r["precision"])
    return next((x for x in rows if x["engine"] == "llama.cpp" and x["precision"] == want and x["batch"] == r["batch"]),
                None)


def render(data: dict, note: str | None) -> str:
    m = data["machine"]
    cores = m["cores"] or 1
    loads = [m.get("load_average"), m.get("load_average_end")]
    worst = max([la[0] for la in loads if la] + [x for r in data["rows"] for x in r.get("load_average_1m", [])],
                default=0.0)
    contended = worst > cores + 0.5  # the benchmark itself keeps up to `cores` threads busy
    s = data["settings"]
    title = TITLES.get(data.get("shape", "smollm2"), data.get("shape"))
    out = [f"## {title}: nx against llama.cpp at every precision", ""]
    if contended or note:
        out += [
            f"> **Preliminary{' / contended' if contended else ''}.** "
            + (note + " " if note else "")
            + (f"The 1-minute load average reached {worst:.2f} on {cores} cores during this run (other jobs were "
               "running), so every timing below is unreliable; re-run on a quiet machine." if contended else ""),
            "",
        ]
    out += [
        f"{title}, greedy, exactly {s['new_tokens']} new tokens per row (EOS banned), decode prompt "
        f"{s['prompt_tokens']} tokens, TTFT prompt {s['ttft_prompt_tokens']} tokens, "
        f"{'median' if s.get('statistic', 'median') == 'median' else 'best'} of {s['repeats']} runs after one warm-up"
        f"{' in each of ' + str(s.get('passes', 1)) + ' passes' if s.get('passes', 1) > 1 else ''}.",
        "",
        data["note"],
        "",
        "### Results",
        "",
        "| engine | precision | batch | decode tok/s | p50 ms/step | p99 ms/step | TTFT ms "
        f"({s['prompt_tokens']} tok) | TTFT ms ({s['ttft_prompt_tokens']} tok) | MB/token | GB/s | % memory roof | "
        "% compute roof | nx / llama.cpp (decode) | nx / llama.cpp (TTFT 128) | load 1m | memory GB/s (passes) |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = data["rows"]
    for r in rows:
        peer = peer_row(rows, r)
        dec = r["decode_tokens_per_s"] / peer["decode_tokens_per_s"] if peer else None
        ttft = r["ttft128_s"] / peer["ttft128_s"] if peer and "ttft128_s" in r and "ttft128_s" in peer else None
        engine = r["engine"] + (f" ({r['tool']})" if r.get("tool") else "")
        out.append(
            f"| {engine} | {r['precision']} | {r['batch']} | {fmt(r['decode_tokens_per_s'])} | "
            f"{fmt(r.get('latency_p50_ms'))} | {fmt(r.get('latency_p99_ms'))} | {fmt(r.get('ttft_s'), '.0f', 1e3)} | "
            f"{fmt(r.get('ttft128_s'), '.0f', 1e3)} | {fmt(r['bytes_per_token'], '.0f', 1e-6)} | "
            f"{fmt(r['achieved_gbs'])} | {fmt(r.get('memory_fraction', r['fraction_of_roofline']), '.0f', 100)} | "
            f"{fmt(r.get('compute_fraction'), '.0f', 100)} | "
            f"{fmt(dec, '.2f')}{'x' if dec else ''} | {fmt(ttft, '.2f')}{'x' if ttft else ''} | "
            f"{loadavg(r.get('load_average_1m'))} | "
            f"{' / '.join(f'{x:.0f}' for x in r.get('passes_bandwidth_gbs', [])) or '-'} |"
        )
    out += [
        "",
        "Precisions: nx `bf16` is amp (bf16 weights, activations and KV cache); `s8` per-channel int8 and `s4` "
        "4-bit in groups of 32, both quantized by nx from the f32 weights; `q8_0` / `q4_0` are llama.cpp's own files "
        "loaded with `quant=\"gguf\"` (the same blocks llama.cpp runs). Each nx row is compared with llama.cpp at "
        "the same precision (s8 with q8_0, s4 with q4_0) and batch.",
        "",
        "MB/token: bytes a decode step reads per generated token (weights / batch, plus the KV cache of the "
        "positions a row's step attends: nx's cache dtype, llama.cpp's f16; weights: nx's parameters, "
        "llama.cpp's GGUF file size). % memory roof: achieved bytes/s over the "
        "bandwidth probe. % compute roof: one multiply-accumulate per weight and token row, over the compute "
        "probe's peak for the precision's dot instructions (f32 FMA, bf16 dot, int8 dot). load 1m: the 1-minute "
        "load average before / after the row's timed runs (above the core count, other jobs shared the cores). "
        "memory GB/s: the memory probe at the start of each pass of the row's round (`--passes`); the row's "
        "figures are the best (or, with `--statistic median`, the median) over its runs and passes, for every "
        "engine alike (BENCHMARKS.md, \"Memory slowdowns are episodes\").",
        "",
        "![decode tokens/s](benchmarks/results/decode.png)",
        "",
    ]
    bw = data.get("bandwidth")
    if bw:
        out += [
            f"Machine bandwidth probe (numpy sum streaming a {bw['array_bytes'] / 1e9:.1f} GB array, best of "
            f"{bw['reps']}): {bw['single_thread_gbs']:.1f} GB/s on 1 thread, {bw['multi_thread_gbs']:.1f} GB/s on "
            f"{bw['threads']} threads.",
            "",
        ]
    if data.get("compute"):
        out += ["Compute probe (`benchmarks/roofline.py`, register-only instruction chains on every thread, GMAC/s): "
                + ", ".join(f"{k} {v:.0f}" for k, v in data["compute"].items() if v) + ".", ""]
    bench = data.get("nx_bench")
    if bench:
        run = bench["runs"][0]
        p = run["prompts"][0]
        warm = f", first call of each program (`warmup`) {run['warmup_s']:.1f} s" if "warmup_s" in run else ""
        threads = f" ({run['compile_workers']} threads)" if "compile_workers" in run else ""
        out += [
            "### nx bench (fresh process, batch 1, default buckets)",
            "",
            f"Position buckets {run['n_positions']}, prompt buckets {run['context_buckets']} "
            f"({run['n_programs']} programs): load {run['load_s']:.1f} s, cold compile {run['compile_s']:.1f} s{threads}{warm}; "
            f"weights {run['weight_bytes'] / 1e6:.0f} MB + KV cache {run['kv_cache_bytes'] / 1e6:.0f} MB, peak RSS "
            f"{run['peak_rss_bytes'] / 1e6:.0f} MB ({run['peak_rss_ratio']:.2f}x; the whole process, Python and "
            f"jax included: it held {(run.get('rss_before_load_bytes') or 0) / 1e6:.0f} MB before loading, growth "
            f"{run.get('peak_rss_growth_ratio') or float('nan'):.2f}x). Prompt {p['prompt_tokens']} "
            f"tokens: TTFT {p['ttft_s'] * 1e3:.0f} ms, decode {p['decode_tokens_per_s']:.1f} tok/s, p50 "
            f"{p['latency_p50_ms']:.1f} ms, p99 {p['latency_p99_ms']:.1f} ms, {p['bandwidth_gbs']:.1f} GB/s.",
            "",
        ]
        if "compile_from_cache_s" in run:
            out += [
                f"The same {run['compile_cache_hits']} programs again from the compile cache (`nx.compile_cache`, "
                f"what a second `nx.load` of this model does: lower each program, load the stored executable): "
                f"{run['compile_from_cache_s']:.1f} s against the cold compile's {run['compile_s']:.1f} s.",
                "",
            ]
        if "cached_load_s" in run:
            out += [
                f"Saved as a compiled artifact (`model.save`, {run['artifact_bytes'] / 1e6:.0f} MB, {run['save_s']:.1f} s), "
                f"`nx.load(dir)` takes {run['cached_load_s']:.1f} s (against load {run['load_s']:.1f} s + compile "
                f"{run['compile_s']:.1f} s from the checkpoint), first token after it {run['cached_first_token_s'] * 1e3:.0f} ms.",
                "",
            ]
    out += ["### Targets (issues #7 and #22)", "", "| target | measured | bound | result |", "| --- | ---: | ---: | --- |"]
    for t in data["targets"]:
        verdict = "not measured" if t["pass"] is None else ("pass" if t["pass"] else "**miss**")
        out.append(f"| {t['target']} | {fmt(t['value'], '.2f')} | {t['op']} {t['bound']} | {verdict} |")
    v = m["versions"]
    ram = f"{m['ram_bytes'] / 2**30:.0f} GiB" if m.get("ram_bytes") else "?"
    out += [
        "",
        "### Machine and versions",
        "",
        f"- CPU: {m['cpu']}, {m['cores']} cores, {ram} RAM; {m['platform']}, Python {m['python']}",
        f"- date: {m['date']}; load average (1, 5, 15 min) at start {loadavg(m.get('load_average'))}, "
        f"at end {loadavg(m.get('load_average_end'))}",
        "- " + ", ".join(f"{k} {val}" for k, val in v.items()),
        f"- threads: llama.cpp, torch and the probe {s['threads']}"
        + ("" if "llama.cpp" not in s["engines"] else "; llama.cpp extra buffer types (AMX/repacked kernels) "
           + ("on" if s.get("llama_cpp_extra_bufts") else "off (they crash on CPUs with AMX)")),
        "- nx CPU kernels: " + ", ".join(sorted({r["cpu_kernels"] for r in data["rows"] if r.get("cpu_kernels")})),
        "",
        "### Re-run",
        "",
        COMMANDS,
        "",
        "`nx bench` alone (any checkpoint; random prompt ids, no tokenizer needed):",
        "",
        "```bash",
        "nx bench llama path/to/model.gguf --batch-sizes 1,8 --prompt-lengths 16,128,512 --new-tokens 128",
        "```",
        "",
    ]
    return "\n".join(out)


def markers(results: Path) -> tuple[str, str]:
    """The BEGIN / END lines of `results`' block (compare.json keeps the original END line)."""
    suffix = "" if results.name == "compare.json" else f" ({results.name})"
    return BEGIN.format(name=results.name), END.format(suffix=suffix)


def merge(existing: str | None, block: str, begin: str, end: str) -> str:
    """`existing` with its generated block replaced by `block` (inserted after the title if absent)."""
    if not existing:
        return f"# Benchmarks\n\n{block}\n"
    if begin in existing and end in existing:
        head, rest = existing.split(begin, 1)
        return head + block + rest.split(end, 1)[1]
    lines = existing.splitlines(keepends=True)
    if lines and lines[0].startswith("# "):
        return lines[0] + "\n" + block + "\n\n" + "".join(lines[1:]).lstrip("\n")
    return block + "\n\n" + existing


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="render BENCHMARKS.md from compare.py's JSON")
    ap.add_argument("results", nargs="?", type=Path, default=ROOT / "results" / "compare.json")
    ap.add_argument("--out", type=Path, default=ROOT.parent / "BENCHMARKS.md")
    ap.add_argument("--note", default=None, help="a sentence to put at the top (e.g. why a run is preliminary)")
    args = ap.parse_args(argv)
    if not args.results.exists():
        sys.exit(f"error: {args.results} does not exist; run python benchmarks/compare.py first")
    begin, end = markers(args.results)
    block = f"{begin}\n{render(json.loads(args.results.read_text()), args.note).rstrip()}\n{end}"
    args.out.write_text(merge(args.out.read_text() if args.out.exists() else None, block, begin, end))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
