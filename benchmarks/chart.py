"""Bar chart of decode tokens/s per engine and batch size from `compare.py`'s JSON.

    python benchmarks/chart.py [benchmarks/results/compare.json] [--out benchmarks/results/decode.png]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="decode tokens/s bar chart from compare.py's JSON")
    ap.add_argument("results", nargs="?", type=Path, default=ROOT / "results" / "compare.json")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "decode.png")
    args = ap.parse_args(argv)
    try:
        import matplotlib
    except ImportError:
        sys.exit("error: matplotlib is not installed: pip install -c constraints.txt -e './core[bench]'")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not args.results.exists():
        sys.exit(f"error: {args.results} does not exist; run python benchmarks/compare.py first")
    data = json.loads(args.results.read_text())
    rows = data["rows"]
    batches = sorted({r["batch"] for r in rows})
    engines = list(dict.fromkeys(f"{r['engine']} {r['precision']}" for r in rows))
    colors = {e: f"C{i}" for i, e in enumerate(engines)}
    width = 0.8 / len(engines)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(batches) * len(engines)), 4.8))
    labelled: set[str] = set()
    for j, b in enumerate(batches):
        here = [r for r in rows if r["batch"] == b]  # bars of one batch size, centred on its tick
        for k, r in enumerate(here):
            engine = f"{r['engine']} {r['precision']}"
            x = j + (k - (len(here) - 1) / 2) * width
            bars = ax.bar([x], [r["decode_tokens_per_s"]], width, color=colors[engine],
                          label=None if engine in labelled else engine)
            labelled.add(engine)
            ax.bar_label(bars, fmt="%.1f", fontsize=8)
    ax.set_xticks(range(len(batches)), [f"batch {b}" for b in batches])
    ax.set_ylabel("decode tokens/s (all rows)")
    m = data["machine"]
    load = ", ".join(f"{x:.1f}" for x in m.get("load_average") or [])
    ax.set_title(f"SmolLM2-135M greedy decode, {data['settings']['new_tokens']} new tokens\n"
                 f"{m['cpu']}, {m['cores']} cores\n{m['date']}, load average {load}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
