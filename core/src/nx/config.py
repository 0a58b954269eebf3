"""Load options, defined once: `nx.load`'s keywords, artifact option checks and CLI flags all
derive from `OPTIONS`, and `RuntimeConfig` is the compiled part of them.

Kept free of jax so the CLI can build its flags without loading a backend.
"""

from __future__ import annotations

import inspect
import numbers
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from nx import buckets
from nx.errors import ConfigError

AMP = ("f32", "bf16", "f16")
QUANT = ("s8", "s4", "gguf", "f32")  # what `quant` names (or an nx.QuantizationConfig); gguf keeps a file's blocks


# ---- value checks: each returns the normalized value or raises ConfigError naming the option ----
def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def positive_int(name: str, v: Any) -> int:
    if not _is_int(v) or v < 1:
        raise ConfigError(f"{name} must be a positive int, got {v!r}")
    return int(v)


def optional(check: Callable[[str, Any], Any]) -> Callable[[str, Any], Any]:
    return lambda name, v: None if v is None else check(name, v)


def choice(*allowed: str) -> Callable[[str, Any], str]:
    def check(name: str, v: Any) -> str:
        if v not in allowed:
            raise ConfigError(f"{name} must be one of {', '.join(allowed)}, got {v!r}")
        return v

    return check


def flag(name: str, v: Any) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be True or False, got {v!r}")
    return v


def text(name: str, v: Any) -> str:
    if not isinstance(v, str) or not v:
        raise ConfigError(f"{name} must be a non-empty string, got {v!r}")
    return v


def int_list(name: str, v: Any) -> int | tuple[int, ...]:
    """An int or a non-empty sequence of positive ints (bucket lists)."""
    if _is_int(v):
        return positive_int(name, v)
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not v or not all(_is_int(x) and x > 0 for x in v):
        raise ConfigError(f"{name} must be a positive int or a non-empty list of positive ints, got {v!r}")
    return tuple(int(x) for x in v)


def device_ids(name: str, v: Any) -> tuple[int, ...]:
    if isinstance(v, (str, bytes)) or not isinstance(v, Sequence) or not all(_is_int(x) and x >= 0 for x in v):
        raise ConfigError(f"{name} must be a list of device ids (ints >= 0), got {v!r}")
    return tuple(int(x) for x in v)


def cache_setting(name: str, v: Any) -> bool | str | os.PathLike:
    if not isinstance(v, (bool, str, os.PathLike)):
        raise ConfigError(f"{name} must be True, False or a directory, got {v!r}")
    return v


def anything(name: str, v: Any) -> Any:
    return v


@dataclass(frozen=True)
class Option:
    """One load option: its default, a phrase of help, how it is checked, its CLI flag (None: not
    on the CLI) and whether a compiled artifact fixes it (`baked`)."""

    name: str
    default: Any
    help: str
    check: Callable[[str, Any], Any]
    flag: str | None = None
    baked: bool = False

    def validate(self, value: Any) -> Any:
        return self.check(self.name, value)


OPTIONS: tuple[Option, ...] = (
    Option("batch_size", 1, "Sequences decoded together: the rows of every compiled program.", positive_int,
           "--batch-size", baked=True),
    Option("prompt_batch_size", None, "Prompt rows encoded once and broadcast to batch_size rows (default: batch_size).",
           optional(positive_int), "--prompt-batch-size", baked=True),
    Option("n_positions", 1024, "Position buckets (KV-cache lengths a decode program attends over): "
           "an int means powers of two up to it; the largest is the longest sequence.", int_list,
           "--n-positions", baked=True),
    Option("context_length_estimate", None, "Prompt buckets (prompt lengths a prefill program encodes at once): an int "
           "or a list; longer prompts run in chunks. Default: powers of two up to n_positions, at most 1024.",
           optional(int_list), "--context-length-estimate", baked=True),
    Option("amp", "f32", "Compute and KV-cache dtype (automatic mixed precision): f32, bf16 or f16.", choice(*AMP),
           "--amp", baked=True),
    Option("kv_dtype", None, "KV-cache dtype: f32, bf16 or f16 (default: amp's). A 16-bit cache under f32 compute "
           "halves the cache's memory and what each decode step reads at long context; keys and values are rounded "
           "once as they are written, and attention's weights to the cache dtype (as llama.cpp's f16 cache does).",
           optional(choice(*AMP)), "--kv-dtype", baked=True),
    Option("backend", "cpu", "PJRT platform the programs run on: cpu, cuda, neuron.", text, "--backend", baked=True),
    Option("tp_degree", 1, "Tensor-parallel degree: devices the weights and KV cache are sharded over.", positive_int,
           "--tp", baked=True),
    Option("devices", None, "Device ids to run on (default: the first tp_degree).", optional(device_ids), baked=True),
    Option("unroll", None, "Layers per scanned block (a divisor of the layer count): faster compiles, slower CPU "
           "decode. Default: every layer unrolled.", optional(positive_int), "--unroll", baked=True),
    Option("quant", None, "Store weights quantized: s8 = int8 (per-output-channel scales), s4 = 4-bit (scales per "
           "group of 32 inputs), gguf = a GGUF file's Q8_0/Q4_x/Q6_K blocks as they are (by default only when "
           "f32 weights would not fit), f32 = none.", anything, "--quant", baked=True),
    Option("decode_steps", 8, "Decode steps per program call: generate/stream run up to this many tokens per row "
           "in one call (a loop on the device, stopping when every row has met EOS), cutting host round trips; "
           "1 = one call per token.", positive_int, "--decode-steps", baked=True),
    Option("device_memory", None, "Bytes per device for the fit check (default: what the device reports).",
           optional(positive_int)),
    Option("compile", True, "Compile every bucket's program at load (an artifact's load in the background; "
           "False: each on first use).", flag),
    Option("compile_cache", True, "Keep compiled programs on disk (True: $NX_CACHE_DIR or ~/.cache/nx; False: off; "
           "or a directory).", cache_setting),
    Option("preload_tokenizer", False, "Load the tokenizer on a background thread while the weights load (the CLI's "
           "text commands do), instead of on first use of model.tokenizer.", flag),
    Option("warmup", False, "Run each program once at load so first requests skip XLA's first-call setup.", flag),
    Option("progress", None, "Report progress on stderr: True = bars on a terminal, plain lines otherwise; False = "
           "nothing; default: bars on a terminal only.", optional(flag)),
)
BY_NAME = {o.name: o for o in OPTIONS}
BAKED = tuple(o.name for o in OPTIONS if o.baked)


def validate(options: dict[str, Any]) -> dict[str, Any]:
    """Every option checked and normalized, defaults filled in; unknown names are a ConfigError
    listing the valid ones (a typo must not be silently ignored)."""
    unknown = sorted(set(options) - set(BY_NAME))
    if unknown:
        raise ConfigError(f"unknown load option(s) {', '.join(unknown)}; valid options: {', '.join(BY_NAME)}")
    return {o.name: o.validate(options.get(o.name, o.default)) for o in OPTIONS}


def signature(first: list[inspect.Parameter]) -> inspect.Signature:
    """`first` parameters followed by every option as a keyword-only parameter (for `help(nx.load)`)."""
    kw = [inspect.Parameter(o.name, inspect.Parameter.KEYWORD_ONLY, default=o.default) for o in OPTIONS]
    return inspect.Signature(first + kw)


def options_doc() -> str:
    """The options as a docstring section."""
    return "\n".join(f"    {o.name} (default {o.default!r}): {o.help}" for o in OPTIONS)


@dataclass(frozen=True)
class RuntimeConfig:
    """How a model is compiled: batch sizes, buckets, compute dtype and backend (the baked options)."""

    batch_size: int = 1
    n_positions: tuple[int, ...] = (128, 256, 512, 1024)
    context_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    amp: str = "f32"
    backend: str = "cpu"
    prompt_batch_size: int = 1
    tp_degree: int = 1
    devices: tuple[int, ...] | None = None  # device ids to run on (default: the first tp_degree)
    unroll: int | None = None  # layers per scanned block (None: every layer unrolled; see nx.scan)
    decode_steps: int = 8  # decode steps per program call of generate / stream (see buckets.decode_block)
    kv_dtype: str | None = None  # the KV cache's dtype where it differs from amp's (None: amp's)

    @property
    def cache_dtype(self) -> str:
        """The KV cache's dtype name: `kv_dtype`, or `amp` where that is None."""
        return self.kv_dtype or self.amp

    @classmethod
    def build(cls, **options: Any) -> RuntimeConfig:
        """From (a subset of) load options; checks what relates options to each other."""
        o = validate(options)
        batch_size, pbs = o["batch_size"], o["prompt_batch_size"]
        pbs = batch_size if pbs is None else pbs
        if batch_size % pbs:
            raise ConfigError(f"prompt_batch_size={pbs} must divide batch_size={batch_size}")
        devices = o["devices"]
        if devices is not None and (len(devices) != o["tp_degree"] or len(set(devices)) != len(devices)):
            raise ConfigError(f"devices={list(devices)} must name tp_degree={o['tp_degree']} distinct device ids")
        pos = buckets.position_buckets(o["n_positions"])
        ctx = buckets.context_buckets(o["context_length_estimate"], pos)
        kv = None if o["kv_dtype"] == o["amp"] else o["kv_dtype"]  # one spelling of each layout
        return cls(batch_size, tuple(pos), tuple(ctx), o["amp"], o["backend"], pbs, o["tp_degree"], devices, o["unroll"],
                   o["decode_steps"], kv)

    def baked(self, quant: dict | None) -> dict[str, Any]:
        """The baked options as `nx.load` would normalize them (artifact option checks compare these)."""
        return {"batch_size": self.batch_size, "prompt_batch_size": self.prompt_batch_size,
                "n_positions": self.n_positions, "context_length_estimate": self.context_buckets, "amp": self.amp,
                "backend": self.backend, "tp_degree": self.tp_degree, "devices": self.devices, "unroll": self.unroll,
                "decode_steps": self.decode_steps, "quant": quant, "kv_dtype": self.kv_dtype}

    @property
    def max_positions(self) -> int:
        return self.n_positions[-1]

    @property
    def broadcast(self) -> int:
        """Output rows per prompt row (context broadcasting)."""
        return self.batch_size // self.prompt_batch_size
