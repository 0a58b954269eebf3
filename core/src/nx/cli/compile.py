"""``nx compile``: compile every bucket and save a servable artifact."""

from __future__ import annotations

from typing import Any

import click

from nx.cli import (
    DEFAULT_FLAGS,
    from_cache,
    load_kwargs,
    load_model,
    main,
    model_options,
    quiet_option,
    serving_load_kwargs,
)


@main.command("compile")
@click.argument("target")
@click.argument("path", required=False)
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False),
              help="Artifact directory to write (weights, compiled programs, tokenizer, manifest).")
@model_options("batch_size", "prompt_batch_size", *DEFAULT_FLAGS)
@click.option("--sampling", is_flag=True, help="Also compile the sampling variant of every program.")
@click.option("--serving", is_flag=True, help="Also compile the programs nx serve runs (continuous batching); without "
              "--context-length-estimate, with nx serve's prompt buckets.")
@click.option("--dump-hlo", default=None, type=click.Path(file_okay=False),
              help="Also write each program's HLO (text + serialized HloModuleProto) to this directory.")
@click.option("--workers", default=None, type=int, help="Programs compiled in parallel threads (default: min(4, CPUs)).")
@quiet_option
def compile_cmd(
    target: str,
    path: str | None,
    out: str,
    sampling: bool,
    serving: bool,
    dump_hlo: str | None,
    workers: int | None,
    quiet: bool,
    **load: Any,
) -> None:
    """Compile every bucket and save a servable artifact: ``nx compile [FAMILY] PATH --out DIR``.

    The artifact holds every greedy program a prompt of any length up to the largest --n-positions
    bucket runs, so ``nx generate DIR`` (or ``nx.load(DIR)``) then starts without the checkpoint
    and answers without compiling. The directory is printed on stdout; progress and a summary go
    to stderr (none with --quiet).
    """
    import time
    from pathlib import Path

    from nx.progress import plural
    from nx.xla_options import default_workers

    t0 = time.perf_counter()
    kwargs = serving_load_kwargs(path or target, load) if serving else load_kwargs(**load)
    model = load_model(target, path, quiet, **kwargs)
    if dump_hlo:
        model.dump_to = dump_hlo
    t1 = time.perf_counter()
    n_workers = workers or default_workers()
    model.save(out, sampling=sampling, serving=serving, workers=n_workers, progress=not quiet)
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    if not quiet:
        click.echo(
            f"compiled {plural(len(model.compiled_shapes), 'program')} into {out} ({size / 2**20:.1f} MiB) | "
            f"load {t1 - t0:.1f}s | compile+save {t2 - t1:.1f}s ({n_workers} workers){from_cache(model)}"
            + (f" | HLO in {dump_hlo}" if dump_hlo else ""),
            err=True,
        )
    click.echo(out)
