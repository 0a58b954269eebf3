"""``nx bench``: compile time, latency, throughput and memory of a model."""

from __future__ import annotations

from typing import Any

import click

from nx import config
from nx.cli import load_kwargs, main, model_options, quiet_option


@main.command()
@click.argument("target")
@click.argument("path", required=False)
@click.option("--batch-sizes", default="1,8", show_default=True,
              help="Comma list of batch sizes (rows decoded together); one model load per batch size.")
@click.option("--prompt-lengths", default="16,128,512", show_default=True,
              help="Comma list of prompt lengths in tokens (random ids) to time the first token of.")
@click.option("--new-tokens", "--max-new-tokens", "-n", "new_tokens", default=128, show_default=True, type=int,
              help="Tokens generated per run (exactly: EOS is banned).")
@model_options()
@click.option("--cached-load/--no-cached-load", default=True, show_default=True,
              help="Also save a compiled artifact (model.save) to a temporary directory and time nx.load from it.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random prompt ids.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
@quiet_option
def bench(
    target: str,
    path: str | None,
    batch_sizes: str,
    prompt_lengths: str,
    new_tokens: int,
    cached_load: bool,
    seed: int,
    as_json: bool,
    quiet: bool,
    **load: Any,
) -> None:
    """Measure compile time, time to first token, decode tokens/s, latency, memory and bandwidth.

    ``nx bench [FAMILY] PATH``: prompts are random token ids, so no tokenizer is needed. Progress
    goes to stderr (none with --quiet); the report (or JSON with --json) to stdout.
    """
    import json

    from nx import bench as nx_bench

    def ints(value: str, name: str) -> list[int]:
        try:
            out = [int(p) for p in value.split(",") if p.strip()]
        except ValueError:
            out = []
        if not out:
            raise click.BadParameter(f"expected a comma list of ints, got {value!r}", param_hint=name)
        return out

    options = {k: v for k, v in load_kwargs(**load).items() if v != config.BY_NAME[k].default or k == "n_positions"}
    result = nx_bench.run(
        target,
        path,
        batch_sizes=ints(batch_sizes, "--batch-sizes"),
        prompt_lengths=ints(prompt_lengths, "--prompt-lengths"),
        new_tokens=new_tokens,
        seed=seed,
        cached_load=cached_load,
        progress=False,
        log=None if quiet else lambda msg: click.echo(msg, err=True),
        **options,
    )
    click.echo(json.dumps(result, indent=2) if as_json else nx_bench.format_table(result))
