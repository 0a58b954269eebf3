"""The ``nx`` command line: ``nx list-models``, ``nx generate``, ``nx serve``, ``nx bench``, ``nx compile`` and
``nx cache``.

This package holds the click group `main`, its error handling and the helpers every command
shares (`model_options`, `load_kwargs`, ...); each command is a module of its own, registered on
`main` when the package is imported. Heavy libraries (jax, torch, transformers) are imported inside
the commands that need them, so ``nx list-models`` stays fast.
"""

from __future__ import annotations

import importlib
import sys
from typing import Any

import click

from nx import config
from nx.errors import ConfigError, InputError, NxError


def int_list(value: str | None) -> list[int] | int | None:
    """``"128"`` -> 128, ``"128,256"`` -> [128, 256] (bucket flags); anything else is a usage error."""
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.split(",") if p.strip()]
    except ValueError:
        parts = []
    if not parts:
        raise click.BadParameter(f"{value!r} is not an int or a comma-separated list of ints, e.g. 128 or 128,512")
    return parts[0] if len(parts) == 1 else parts


class NxGroup(click.Group):
    """Turns `NxError`s into one clear line and exit code 2 instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NxError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)


#: click type of each load option that has a CLI flag (others are plain strings).
FLAG_TYPES = {"batch_size": int, "prompt_batch_size": int, "tp_degree": int, "unroll": int, "decode_steps": int,
               "amp": click.Choice(list(config.AMP)), "kv_dtype": click.Choice(list(config.AMP)),
               "quant": click.Choice(list(config.QUANT))}
DEFAULT_FLAGS = ("n_positions", "context_length_estimate", "amp", "kv_dtype", "backend", "tp_degree", "unroll",
                 "decode_steps", "quant")


#: --quant's sub-options, added after --quant wherever it is (see `quant_config`).
QUANT_SUBOPTIONS = (
    click.option("--dequant-dtype", default=None, type=click.Choice(list(config.AMP)),
                 help="With --quant: dtype int8 weights are converted to for matmuls on accelerators "
                      "(default: --amp); the CPU multiplies int8 directly."),
    click.option("--no-quantize", default=None,
                 help="With --quant: comma list of parameter-name patterns kept in floating point (e.g. lm_head.w)."),
    click.option("--group-size", type=int, default=None,
                 help="With --quant s8/s4: inputs sharing one scale (s4 default 32; s8 default: one per row)."),
)


def model_options(*names: str):
    """Add the CLI flags of these load options (default: how a model is compiled), with the help
    text, defaults and flag names of `nx.config.OPTIONS`, so every command spells them alike
    (--quant brings --dequant-dtype and --no-quantize)."""

    def decorate(command):
        for name in reversed(names or DEFAULT_FLAGS):
            o = config.BY_NAME[name]
            kind = FLAG_TYPES.get(name, str)
            default = o.default if o.default is None or kind is not str else str(o.default)
            if name == "quant":  # its sub-options follow it (decorators apply bottom-up)
                for sub_option in reversed(QUANT_SUBOPTIONS):
                    command = sub_option(command)
            command = click.option(o.flag, name, type=kind, default=default, show_default=o.default is not None,
                                   help=o.help)(command)
        return command

    return decorate


def load_kwargs(dequant_dtype: str | None = None, no_quantize: str | None = None, group_size: int | None = None,
                **values: Any) -> dict:
    """The CLI values of load options as `nx.load` keywords (bucket lists parsed, quantization
    options combined into one `QuantizationConfig`)."""
    out = dict(values)
    for name in ("n_positions", "context_length_estimate"):
        if name in out:
            out[name] = int_list(out[name])
    out["quant"] = quant_config(out.get("quant"), dequant_dtype, no_quantize, group_size)
    return out


def serving_load_kwargs(where: str, load: dict[str, Any]) -> dict[str, Any]:
    """`load_kwargs` for a model built to serve (`nx serve`, `nx compile --serving`): without
    --context-length-estimate a checkpoint gets `nx.buckets.serving_context_buckets`; a saved
    artifact keeps the buckets it was built with."""
    from nx import artifacts, buckets

    kw = load_kwargs(**load)
    if kw.get("context_length_estimate") is None and not artifacts.is_artifact(where):
        n = kw.get("n_positions")
        positions = buckets.position_buckets(config.BY_NAME["n_positions"].default if n is None else n)
        kw["context_length_estimate"] = buckets.serving_context_buckets(positions)
    return kw


def quant_config(quant: str | None, dequant_dtype: str | None = None, no_quantize: str | None = None,
                 group_size: int | None = None):
    """The `QuantizationConfig` of the --quant options (None without --quant, ``"f32"`` for --quant
    f32; its sub-options without s8 / s4 are an error)."""
    from nx.quant import QuantizationConfig, patterns

    if quant in (None, "f32", "gguf"):
        given = [flag for flag, v in (("--dequant-dtype", dequant_dtype), ("--no-quantize", no_quantize),
                                      ("--group-size", group_size)) if v]
        if given:
            raise ConfigError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --quant s8 or s4")
        return quant
    return QuantizationConfig(quant, dequant_dtype, patterns(no_quantize), group_size)


@click.group(cls=NxGroup)
@click.version_option(package_name="nx-core", prog_name="nx")
def main() -> None:
    """nx: LLM inference from Hugging Face checkpoints, compiled with XLA."""


def from_cache(model) -> str:
    """" (k of n programs from the compile cache)" when the compile cache supplied any, else ""."""
    cc = model.compile_cache
    if cc is None or not cc.hits:
        return ""
    return f" ({cc.hits} of {cc.hits + cc.misses} programs from the compile cache)"


quiet_option = click.option(
    "--quiet", "-q", is_flag=True,
    help="No progress, log or timing lines on stderr: only results (stdout) and errors.",
)


def sampling_options(command):
    """The flags choosing tokens (`nx generate`, `nx chat`): --max-new-tokens, greedy unless a
    sampling flag is given, and the seed."""
    for option in reversed((
        click.option("--max-new-tokens", "-n", default=64, show_default=True, type=int,
                     help="Most tokens generated per answer (fewer if EOS comes first)."),
        click.option("--temperature", type=float, default=None, help="Sample with this temperature (default: greedy)."),
        click.option("--top-k", type=int, default=None, help="Sample from the k most likely tokens."),
        click.option("--top-p", type=float, default=None,
                     help="Sample from the smallest set of tokens with this probability mass (nucleus sampling)."),
        click.option("--repetition-penalty", type=float, default=1.0, show_default=True,
                     help="Divide the scores of tokens already seen by this (1.0: off; HF's repetition_penalty)."),
        click.option("--seed", type=int, default=None, help="Seed for reproducible sampling."),
    )):
        command = option(command)
    return command


def sampling_params(temperature: float | None, top_k: int | None, top_p: float | None, repetition_penalty: float,
                    seed: int | None):
    """The checked `SamplingParams` of the sampling flags: any of --temperature/--top-k/--top-p
    samples; bad values fail here, before anything compiles."""
    from nx.generation import SamplingParams

    sample = temperature is not None or top_k is not None or top_p is not None
    return SamplingParams(sample, 1.0 if temperature is None else temperature, top_k, 1.0 if top_p is None else top_p,
                          repetition_penalty, seed).validated()


def load_model(target: str, path: str | None, quiet: bool, **options: Any):
    """``nx.load(target[, path], compile=False, ...)`` announcing itself unless `quiet` (progress
    lines off a terminal); commands compile only the programs they run, afterwards."""
    import nx
    from nx import progress

    args = (target, path) if path else (target,)
    options.setdefault("progress", not quiet)
    options.setdefault("preload_tokenizer", True)  # beside the weights: every command here turns text into ids
    with progress.step(f"loading {path or target}", not quiet):
        return nx.load(*args, compile=False, **options)


def text_tokenizer(model, where: str, command: str):
    """The model's tokenizer, or a `CheckpointError` naming the files looked for: `command`
    turns text into token ids (token ids given to ``model.generate`` need no tokenizer)."""
    from nx.checkpoint import missing_tokenizer

    if model.tokenizer is None:
        raise missing_tokenizer(where, f"nx {command}")
    return model.tokenizer


def encode(tok, text: str, as_chat: bool) -> list[int]:
    """Token ids of `text`, as a user message in the tokenizer's chat template if `as_chat`."""
    return chat_ids(tok, [{"role": "user", "content": text}]) if as_chat else list(tok(text)["input_ids"])


def chat_ids(tok, messages: list[dict]) -> list[int]:
    """Token ids of a conversation in the tokenizer's chat template, ending where the assistant's
    answer begins; an `InputError` if the tokenizer has no template."""
    if not getattr(tok, "chat_template", None):
        raise InputError("this tokenizer has no chat template, so it cannot format a conversation; "
                         "use nx generate without --chat for plain text continuation")
    return list(tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=True)["input_ids"])


# Each command lives in its own module; importing it registers it on `main`.
for _command in ("list_models", "generate", "chat", "serve", "bench", "compile", "cache"):
    importlib.import_module(f"nx.cli.{_command}")
