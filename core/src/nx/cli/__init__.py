"""The ``nx`` command line: ``nx list-models``, ``nx generate``, ``nx serve``, ``nx bench``, ``nx compile`` and
``nx cache``.

This package holds the click group `main`, its error handling and the helpers every command
shares (`model_options`, `load_kwargs`, ...); each command is a module of its own, registered on
`main` when the package is imported. Heavy libraries (jax, torch, transformers) are imported inside
the commands that need them, so ``nx list-models`` stays fast.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from nx import config
from nx.errors import ConfigError, NxError


def int_list(value: str | None) -> list[int] | int | None:
    """``"128"`` -> 128, ``"128,256"`` -> [128, 256] (bucket flags); anything else is a usage error."""
    if value is None:
        return None
    try:
        parts = [int(p) for p in value.split(",") if p.strip()]
    except ValueError:
        parts = []
    if not parts:
        raise click.BadParameter(f"expected an int or a comma list of ints, got {value!r}")
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
FLAG_TYPES = {"batch_size": int, "prompt_batch_size": int, "tp_degree": int, "unroll": int,
               "amp": click.Choice(list(config.AMP)), "quant": click.Choice(list(config.QUANT))}
DEFAULT_FLAGS = ("n_positions", "context_length_estimate", "amp", "backend", "tp_degree", "unroll", "quant")


def model_options(*names: str):
    """Add the CLI flags of these load options (default: how a model is compiled), with the help
    text, defaults and flag names of `nx.config.OPTIONS`, so every command spells them alike."""

    def decorate(command):
        for name in reversed(names or DEFAULT_FLAGS):
            o = config.BY_NAME[name]
            kind = FLAG_TYPES.get(name, str)
            default = o.default if o.default is None or kind is not str else str(o.default)
            command = click.option(o.flag, name, type=kind, default=default, show_default=o.default is not None,
                                   help=o.help)(command)
        return command

    return decorate


def load_kwargs(dequant_dtype: str | None = None, no_quantize: str | None = None, **values: Any) -> dict:
    """The CLI values of load options as `nx.load` keywords (bucket lists parsed, quantization
    options combined into one `QuantizationConfig`)."""
    out = dict(values)
    for name in ("n_positions", "context_length_estimate"):
        if name in out:
            out[name] = int_list(out[name])
    out["quant"] = quant_config(out.get("quant"), dequant_dtype, no_quantize)
    return out


def quant_config(quant: str | None, dequant_dtype: str | None = None, no_quantize: str | None = None):
    """The `QuantizationConfig` of the --quant options (None without --quant; its sub-options alone
    are an error)."""
    from nx.quant import QuantizationConfig, patterns

    if quant is None:
        given = [flag for flag, v in (("--dequant-dtype", dequant_dtype), ("--no-quantize", no_quantize)) if v]
        if given:
            raise ConfigError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --quant s8")
        return None
    return QuantizationConfig(quant, dequant_dtype, patterns(no_quantize))


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


# Each command lives in its own module; importing them registers them on `main`.
from nx.cli import bench, cache, compile, generate, list_models, serve  # noqa: E402,F401
