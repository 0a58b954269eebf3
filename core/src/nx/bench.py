"""`nx bench`: how fast one model compiles, answers and decodes, and how close it runs to the
memory-bandwidth bound.

For each batch size the model is loaded (``compile=False``), its default programs are compiled
and timed (cold compile, on `NxModel.compile`'s default threads), each is run once and timed
(`NxModel.warmup`: XLA's first-call setup, which a server pays at load with ``warmup=True`` or
else on its first requests), then for each
prompt length a prompt of random token ids is generated greedily for exactly `new_tokens` tokens
(EOS is banned through ``min_new_tokens``, so every run does the same work). `NxModel.stream`
yields each step's tokens once they reach the host; the timestamps give time to first token
(prefill + first token), the per-step decode latencies and the aggregate decode rate. Random ids
mean no tokenizer is needed: the programs do the same work whatever the ids are.
With ``decode_steps`` k > 1 (the default 8, ``--decode-steps``) tokens reach the host k at a time:
each step's latency is then its block's time over the block's k steps (the gaps between tokens
are near zero inside a block and a whole block's time at its first token); the aggregate rate
means the same as with k = 1.

Bytes per decode step are the parameter bytes (every leaf of the parameter tree; a decode step
reads every weight once for the whole batch, except that an untied embedding table is only
gathered from, so for such models this is an upper bound) plus the KV cache bytes of the
positions the step attends to (the filled ones: the least any attention must read; the CPU
attention kernel reads only those, XLA's path the whole position bucket).
Achieved bandwidth is those bytes times the decode steps over the decode time.

Compilation goes through a new, empty compile cache (`nx.compile_cache`) in a temporary directory,
so the cold compile is cold and includes storing the programs, as a first `nx.load` does. Once the
model is measured its programs are dropped and compiled again from that cache: the time a later
`nx.load` of the same model spends on its programs (lowering each, loading the cached executable).

With ``cached_load`` the compiled model is also saved as an artifact (`NxModel.save`) to a
temporary directory, released, and loaded back with ``nx.load(dir)`` (no compile): save time,
artifact size, load time and the first token after it are reported.

Peak resident memory is the whole process's (Python, jax, torch included) high-water mark from
just before the batch size's load (Linux: VmHWM, reset through ``/proc/self/clear_refs``; elsewhere
``ru_maxrss`` over the whole process, so with several batch sizes later ones include earlier peaks).
`peak_rss_ratio` divides it by weights + KV cache; `peak_rss_growth_ratio` divides only the growth
from the RSS before loading.
"""

from __future__ import annotations

import contextlib
import gc
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nx import buckets, xla_options
from nx.config import RuntimeConfig
from nx.errors import ConfigError, NxError
from nx.ops import cpu_kernels

DEFAULT_BATCH_SIZES = (1, 8)
DEFAULT_PROMPT_LENGTHS = (16, 128, 512)
DEFAULT_NEW_TOKENS = 128


@dataclass
class StepTimes:
    """Timestamps of one greedy run: `ttft_s` from the call to the first token on the host, then
    the gap before each following step's tokens (`steps_s`, one per decode step); `block`: the
    decode steps one program call runs (the latencies average the gaps over each such block)."""

    rows: int
    ttft_s: float
    steps_s: list[float]
    block: int = 1

    @property
    def decode_s(self) -> float:
        return float(sum(self.steps_s))

    def summary(self) -> dict[str, float]:
        """TTFT, aggregate decode tokens/s (all rows) and per-step latency percentiles in ms."""
        steps = np.asarray(self.steps_s, np.float64)
        out = {
            "ttft_s": self.ttft_s,
            "new_tokens": len(self.steps_s) + 1,
            "decode_steps": len(self.steps_s),
            "decode_s": self.decode_s,
            "decode_tokens_per_s": float("nan"),
            "latency_p50_ms": float("nan"),
            "latency_p99_ms": float("nan"),
        }
        if steps.size and self.decode_s > 0:
            out["decode_tokens_per_s"] = self.rows * steps.size / self.decode_s
            k = max(1, self.block)
            blocks = [steps[i : i + k] for i in range(0, steps.size, k)]
            latency = np.concatenate([np.full(b.size, b.mean()) for b in blocks])
            out["latency_p50_ms"] = float(np.percentile(latency, 50) * 1e3)
            out["latency_p99_ms"] = float(np.percentile(latency, 99) * 1e3)
        return out


def time_steps(steps: Callable[[], Any], rows: int, block: int = 1) -> StepTimes:
    """Timestamp every item `steps()` yields (each must already be on the host when yielded);
    `block`: the decode steps one program call runs."""
    t0 = time.perf_counter()
    stamps = [time.perf_counter() for _ in steps()]
    if not stamps:
        raise ConfigError("the run produced no tokens; ask for at least one new token")
    return StepTimes(rows, stamps[0] - t0, list(np.diff(stamps)), block)


def time_stream(model: Any, ids: np.ndarray, new_tokens: int) -> StepTimes:
    """Greedy `model.stream` of exactly `new_tokens` tokens (EOS banned), timestamped per step."""
    rows = model.config.batch_size
    return time_steps(lambda: model.stream(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens), rows,
                      getattr(model.config, "decode_steps", 1))


def tree_nbytes(tree: Any) -> int:
    import jax

    return int(sum(int(getattr(leaf, "nbytes", 0)) for leaf in jax.tree.leaves(tree)))


def bytes_per_step(model: Any, prompt_tokens: int, new_tokens: int) -> dict[str, float]:
    """Weight bytes and mean KV-cache bytes one decode step reads (see the module docstring)."""
    weights = tree_nbytes(model.params)
    cache = tree_nbytes(model.caches)
    # step t feeds the token at slot prompt + t - 1 and attends slots 0 ... prompt + t - 1
    seen = [prompt_tokens + t for t in range(1, new_tokens)] or [prompt_tokens]
    kv = float(np.mean([cache * min(n, model.config.max_positions) / model.config.max_positions for n in seen]))
    return {"weight_bytes_per_step": weights, "kv_bytes_per_step": kv, "bytes_per_step": weights + kv}


def _proc_status_bytes(field: str) -> int | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def peak_rss_bytes() -> int:
    """The process's peak resident set: Linux's VmHWM (this process image only; ``ru_maxrss``
    survives exec, so a child of a big process would report its parent's size), else ru_maxrss
    (KiB on Linux, bytes on macOS)."""
    hwm = _proc_status_bytes("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def rss_bytes() -> int | None:
    """The current resident set (Linux), else None."""
    return _proc_status_bytes("VmRSS")


def reset_peak_rss() -> bool:
    """Restart the peak-RSS count from the current RSS (Linux ``/proc/self/clear_refs``); False
    where that is not possible, and the peak then covers the whole process so far."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """CPU model, cores, RAM, load average and library versions, for the record."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for dist in ("nx-core", "nx-kernels-cpu", "jax", "jaxlib", "numpy", "torch", "transformers", "llama-cpp-python"):
        with contextlib.suppress(PackageNotFoundError):
            versions[dist] = version(dist)
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        ram = None
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": ram,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "versions": versions,
        "cpu_kernels": cpu_kernels.describe(),
    }


def random_prompt(vocab: int, rows: int, length: int, seed: int) -> np.ndarray:
    """Random token ids ``[rows, length]`` (no tokenizer needed; the work does not depend on ids)."""
    return np.random.default_rng(seed).integers(0, vocab, (rows, length), dtype=np.int64)


def bench_model(model: Any, prompt_lengths: Sequence[int], new_tokens: int, seed: int = 0) -> list[dict[str, Any]]:
    """Measure an already compiled model at each prompt length (one warm-up run per length first)."""
    results = []
    rows = model.config.prompt_batch_size
    for i, length in enumerate(prompt_lengths):
        ids = random_prompt(model.spec.vocab_size, rows, length, seed + i)
        time_stream(model, ids, min(2, new_tokens))  # warm-up: chunked prefill compiles on first use
        timing = time_stream(model, ids, new_tokens)
        row: dict[str, Any] = {"prompt_tokens": length, **timing.summary()}
        row.update(bytes_per_step(model, length, new_tokens))
        row["bytes_per_token"] = row["bytes_per_step"] / model.config.batch_size
        row["bandwidth_gbs"] = (
            row["bytes_per_step"] * row["decode_steps"] / row["decode_s"] / 1e9 if row["decode_s"] > 0 else float("nan")
        )
        results.append(row)
    return results


def _check_fits(n_positions: int | Sequence[int], prompt_lengths: Sequence[int], new_tokens: int) -> None:
    need = max(prompt_lengths) + new_tokens
    buckets.check_fits(RuntimeConfig.build(n_positions=n_positions), max(prompt_lengths), new_tokens,
                       f"{new_tokens} new tokens", f"pass --n-positions {need} or lower --prompt-lengths/--new-tokens")


def run(
    target: str,
    path: str | None = None,
    *,
    batch_sizes: Sequence[int] = DEFAULT_BATCH_SIZES,
    prompt_lengths: Sequence[int] = DEFAULT_PROMPT_LENGTHS,
    new_tokens: int = DEFAULT_NEW_TOKENS,
    amp: str = "f32",
    n_positions: int | Sequence[int] = 1024,
    context_length_estimate: int | Sequence[int] | None = None,
    backend: str = "cpu",
    seed: int = 0,
    quant: Any = None,
    cached_load: bool = True,
    progress: bool | None = False,
    log: Callable[[str], None] | None = None,
    **load_options: Any,
) -> dict[str, Any]:
    """Benchmark `target` (a family, with `path`; or a path alone) at each batch size; returns a
    JSON-ready dict (see the module docstring for what each figure means).

    `quant` (``"s8"`` or an `nx.QuantizationConfig`) is passed to `nx.load`. With `cached_load`
    the model is also saved as a compiled artifact (`NxModel.save`) to a temporary directory and
    loaded back: save time, load time from the artifact and its first token are reported.
    """
    import nx

    if not batch_sizes or not prompt_lengths:
        raise ConfigError("give at least one batch size and one prompt length")
    if any(b < 1 for b in batch_sizes) or any(n < 1 for n in prompt_lengths):
        raise ConfigError("batch sizes and prompt lengths must be positive")
    if new_tokens < 2:
        raise ConfigError(f"new_tokens must be >= 2 (one prefill token plus decode steps), got {new_tokens}")
    _check_fits(n_positions, prompt_lengths, new_tokens)
    say = log or (lambda _msg: None)
    args = (target, path) if path else (target,)
    if quant is not None:
        load_options["quant"] = quant
    result: dict[str, Any] = {
        "tool": "nx bench",
        "target": str(target),
        "path": str(path) if path else None,
        "amp": amp,
        "backend": backend,
        "new_tokens": new_tokens,
        "prompt_lengths": list(prompt_lengths),
        "load_options": {k: v for k, v in load_options.items() if k != "quant"},
        "quant": quant.to_dict() if hasattr(quant, "to_dict") else quant,
        "machine": machine_info(),
        "runs": [],
    }
    for b in batch_sizes:
        gc.collect()
        peak_reset = reset_peak_rss()
        rss_before = rss_bytes()
        say(f"batch {b}: loading")
        cache_dir = tempfile.TemporaryDirectory(prefix="nx-bench-cache-")
        t0 = time.perf_counter()
        model = nx.load(
            *args,
            batch_size=b,
            n_positions=n_positions,
            context_length_estimate=context_length_estimate,
            amp=amp,
            backend=backend,
            compile=False,
            compile_cache=cache_dir.name,
            progress=progress,
            **load_options,
        )
        load_s = time.perf_counter() - t0
        shapes = model.program_shapes()
        say(f"batch {b}: compiling {len(shapes)} programs")
        workers = xla_options.default_workers()
        t0 = time.perf_counter()
        model.compile(progress, workers=workers)
        compile_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        model.warmup(progress)
        warmup_s = time.perf_counter() - t0
        say(f"batch {b}: measuring prompt lengths {list(prompt_lengths)} x {new_tokens} new tokens")
        prompts = bench_model(model, prompt_lengths, new_tokens, seed)
        weights, cache = tree_nbytes(model.params), tree_nbytes(model.caches)
        peak = peak_rss_bytes()
        entry: dict[str, Any] = {
            "batch_size": b,
            "n_positions": list(model.config.n_positions),
            "context_buckets": list(model.config.context_buckets),
            "n_programs": len(shapes),
            "load_s": load_s,
            "compile_s": compile_s,
            "compile_workers": workers,
            "warmup_s": warmup_s,
            "weight_bytes": weights,
            "kv_cache_bytes": cache,
            "peak_rss_bytes": peak,
            "peak_rss_reset": peak_reset,
            "rss_before_load_bytes": rss_before,
            "peak_rss_ratio": peak / (weights + cache),
            "peak_rss_growth_ratio": None if rss_before is None else (peak - rss_before) / (weights + cache),
            "prompts": prompts,
        }
        say(f"batch {b}: compiling the programs again from the compile cache")
        entry.update(_compile_from_cache(model, progress))
        cache_dir.cleanup()
        if cached_load:
            say(f"batch {b}: saving a compiled artifact and loading it back")
            rows, vocab = model.config.prompt_batch_size, model.spec.vocab_size
            with tempfile.TemporaryDirectory(prefix="nx-bench-") as d:
                try:
                    t0 = time.perf_counter()
                    model.save(d)
                    entry["save_s"] = time.perf_counter() - t0
                except NxError as exc:  # e.g. a backend that cannot serialize compiled programs
                    entry["cached_load_error"] = str(exc)
                else:
                    model = None  # only the artifact's copy is resident while it loads
                    gc.collect()
                    entry.update(_load_artifact(d, rows, vocab, prompt_lengths[0], seed))
        result["runs"].append(entry)
        del model
    result["machine"]["load_average_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return result


def _compile_from_cache(model: Any, progress: bool | None) -> dict[str, Any]:
    """Drop `model`'s programs and build them again from its (now filled) compile cache."""
    cache = model.compile_cache
    model.drop_programs()
    gc.collect()
    hits = cache.hits
    t0 = time.perf_counter()
    model.compile(progress)
    return {"compile_from_cache_s": time.perf_counter() - t0, "compile_cache_hits": cache.hits - hits}


def _load_artifact(directory: str, rows: int, vocab: int, prompt_tokens: int, seed: int) -> dict[str, Any]:
    """Load time from a saved artifact (`nx.load(dir)`, no compile) and its first token after."""
    import nx

    size = sum(f.stat().st_size for f in Path(directory).rglob("*") if f.is_file())
    t0 = time.perf_counter()
    model = nx.load(directory)
    load_s = time.perf_counter() - t0
    first = time_stream(model, random_prompt(vocab, rows, prompt_tokens, seed), 2).ttft_s
    return {"artifact_bytes": size, "cached_load_s": load_s, "cached_first_token_s": first}


def format_table(result: dict[str, Any]) -> str:
    """A plain-text report of `run`'s result."""
    mb = 1e6
    lines = [
        f"nx bench {result['target']} {result['path'] or ''}  amp={result['amp']}  new_tokens={result['new_tokens']}",
        f"machine: {result['machine']['cpu']}, {result['machine']['cores']} cores, "
        f"load average {', '.join(f'{x:.2f}' for x in result['machine']['load_average'] or [])}, "
        f"CPU kernels (int8, bf16, f32 decode): {result['machine'].get('cpu_kernels', 'none')}",
    ]
    for r in result["runs"]:
        rss = f"peak RSS {r['peak_rss_bytes'] / mb:.0f} MB ({r['peak_rss_ratio']:.2f}x weights+cache"
        if r["rss_before_load_bytes"] is not None:
            rss += f"; {r['rss_before_load_bytes'] / mb:.0f} MB before loading, growth {r['peak_rss_growth_ratio']:.2f}x"
        lines.append(
            f"\nbatch {r['batch_size']}: load {r['load_s']:.2f} s, cold compile {r['compile_s']:.2f} s "
            f"({r.get('compile_workers', 1)} threads), "
            f"first call of each program (warm-up) {r['warmup_s']:.2f} s "
            f"({r['n_programs']} programs; positions {r['n_positions']}, prompts {r['context_buckets']}), "
            f"weights {r['weight_bytes'] / mb:.1f} MB, KV cache {r['kv_cache_bytes'] / mb:.1f} MB, {rss})"
        )
        if "compile_from_cache_s" in r:
            lines.append(
                f"  compile cache: the {r['compile_cache_hits']} cached programs of {r['n_programs']} lowered and "
                f"loaded in {r['compile_from_cache_s']:.2f} s"
            )
        if "cached_load_s" in r:
            lines.append(
                f"  artifact (model.save): save {r['save_s']:.2f} s, {r['artifact_bytes'] / mb:.0f} MB; "
                f"nx.load(dir) {r['cached_load_s']:.2f} s, then first token {r['cached_first_token_s'] * 1e3:.0f} ms"
            )
        elif "cached_load_error" in r:
            lines.append(f"  artifact: {r['cached_load_error']}")
        lines.append(
            f"  {'prompt':>6} {'TTFT ms':>9} {'decode tok/s':>12} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'MB/token':>9} {'GB/s':>7}"
        )
        for p in r["prompts"]:
            lines.append(
                f"  {p['prompt_tokens']:>6} {p['ttft_s'] * 1e3:>9.1f} {p['decode_tokens_per_s']:>12.1f} "
                f"{p['latency_p50_ms']:>8.2f} {p['latency_p99_ms']:>8.2f} {p['bytes_per_token'] / mb:>9.1f} "
                f"{p['bandwidth_gbs']:>7.2f}"
            )
    return "\n".join(lines)
