"""This machine's roofline for decode: the memory probe (benchmarks/compare.py's ``bandwidth_probe``)
and a compute probe, the peak multiply-accumulate rate of the dot instructions each precision's
products use (benchmarks/probe.c, built here with the system C compiler for this CPU).

    python benchmarks/roofline.py [--threads 2]

A decode row's fractions: achieved bytes/s over the memory roof (weights streamed per token), and
achieved multiply-accumulates/s (one per weight element and token row; attention's are left out,
small at these context lengths) over the compute roof of its precision class.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

SOURCE = Path(__file__).resolve().parent / "probe.c"
#: The instruction class each precision's products run on (f32 FMA, bf16 pair dots, int8 dots).
CLASS = {"f32": "f32", "bf16": "bf16", "s8": "int8", "q8_0": "int8", "s4": "int8", "q4_0": "int8"}


def _library(cache_dir: Path) -> ctypes.CDLL:
    cache_dir.mkdir(parents=True, exist_ok=True)
    out = cache_dir / "nx-probe.so"
    if not out.exists() or out.stat().st_mtime < SOURCE.stat().st_mtime:
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            so = Path(tmp) / "probe.so"
            subprocess.run([os.environ.get("CC", "cc"), "-O2", "-march=native", "-shared", "-fPIC", "-o", str(so),
                            str(SOURCE)], check=True)
            so.replace(out)
    lib = ctypes.CDLL(str(out))
    for kind in ("f32", "bf16", "int8"):
        fn = getattr(lib, f"nx_probe_{kind}")
        fn.restype, fn.argtypes = ctypes.c_int64, [ctypes.c_int64]
    return lib


def compute_probe(threads: int, cache_dir: Path, seconds: float = 0.3) -> dict[str, float | None]:
    """Peak GMAC/s of each instruction class over `threads` threads (best of 3; ctypes releases the
    GIL, so the threads run in parallel); None for a class this CPU lacks (bf16 without AVX512_BF16
    is then the f32 FMA roof, as products convert bf16 to f32)."""
    lib = _library(cache_dir)
    out: dict[str, float | None] = {}
    for kind in ("f32", "bf16", "int8"):
        fn = getattr(lib, f"nx_probe_{kind}")
        if fn(1) < 0:
            out[kind] = None
            continue
        iters = 1000
        while True:  # calibrate one thread's call to ~`seconds`
            t0 = time.perf_counter()
            fn(iters)
            if time.perf_counter() - t0 > seconds / 4:
                break
            iters *= 4
        best = 0.0
        for _ in range(3):
            done = [0] * threads

            def work(i: int, fn=fn, iters=iters, done=done) -> None:
                done[i] = fn(iters)

            pool = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
            t0 = time.perf_counter()
            for t in pool:
                t.start()
            for t in pool:
                t.join()
            best = max(best, sum(done) / (time.perf_counter() - t0) / 1e9)
        out[kind] = best
    if out["bf16"] is None:
        out["bf16"] = out["f32"]
    return out


def fractions(row: dict, bandwidth_gbs: float, compute: dict[str, float | None]) -> dict[str, float]:
    """A decode row's memory and compute roofline fractions (see the module docstring); needs
    ``decode_tokens_per_s``, ``bytes_per_token``, ``macs_per_token`` and ``precision``."""
    out = {"memory_fraction": row["decode_tokens_per_s"] * row["bytes_per_token"] / (bandwidth_gbs * 1e9)}
    peak = compute.get(CLASS.get(row["precision"], "f32"))
    if peak and row.get("macs_per_token"):
        out["compute_fraction"] = row["decode_tokens_per_s"] * row["macs_per_token"] / (peak * 1e9)
    return out


def macs_per_token(gguf: Path) -> int:
    """Weight multiply-accumulates per token of a GGUF model: every 2-D weight once, the embedding
    table only as the (tied) output projection."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import gguf as gguf_pkg

    reader = gguf_pkg.GGUFReader(str(gguf))
    names = {t.name for t in reader.tensors}
    total = 0
    for t in reader.tensors:
        if len(t.shape) < 2 or (t.name == "token_embd.weight" and "output.weight" in names):
            continue
        total += int(t.n_elements)
    return total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "nx-bench")
    args = ap.parse_args()
    print(json.dumps({"threads": args.threads, "gmacs": compute_probe(args.threads, args.cache_dir)}, indent=2))


if __name__ == "__main__":
    main()
