"""``nx compile``: compile every bucket and save a servable artifact."""

from __future__ import annotations

from typing import Any

import click

from nx.cli import DEFAULT_FLAGS, from_cache, load_kwargs, main, model_options


@main.command("compile")
@click.argument("target")
@click.argument("path", required=False)
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False), help="Artifact directory to write.")
@model_options("batch_size", "prompt_batch_size", *DEFAULT_FLAGS)
@click.option("--dequant-dtype", default=None, type=click.Choice(["f32", "bf16", "f16"]), help="int8 weights convert to this for matmuls on accelerators (default: --amp); the CPU runs int8 dots.")
@click.option("--no-quantize", default=None, help="Comma list of parameter-name patterns kept in floating point.")
@click.option("--sampling", is_flag=True, help="Also compile the sampling variant of every program.")
@click.option("--serving", is_flag=True, help="Also compile the programs nx serve runs (continuous batching).")
@click.option("--dump-hlo", default=None, type=click.Path(file_okay=False), help="Also write each program's HLO (text + .pb) here.")
@click.option("--workers", default=None, type=int, help="Programs compiled in parallel threads (default: min(4, CPUs)).")
def compile_cmd(
    target: str,
    path: str | None,
    out: str,
    sampling: bool,
    serving: bool,
    dump_hlo: str | None,
    workers: int | None,
    **load: Any,
) -> None:
    """Compile every bucket and save a servable artifact: ``nx compile [FAMILY] PATH --out DIR``.

    ``nx generate DIR`` (or ``nx.load(DIR)``) then starts without the checkpoint and without compiling.
    """
    import time
    from pathlib import Path

    import nx
    from nx.xla_options import default_workers

    t0 = time.perf_counter()
    args = (target, path) if path else (target,)
    model = nx.load(*args, **load_kwargs(**load), compile=False)
    if dump_hlo:
        model.dump_to = dump_hlo
    t1 = time.perf_counter()
    n_workers = workers or default_workers()
    model.save(out, sampling=sampling, serving=serving, workers=n_workers)
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    click.echo(
        f"compiled {len(model.compiled_shapes)} programs into {out} ({size / 2**20:.1f} MiB) | load {t1 - t0:.1f}s | "
        f"compile+save {t2 - t1:.1f}s ({n_workers} workers){from_cache(model)}" + (f" | HLO in {dump_hlo}" if dump_hlo else ""),
        err=True,
    )
    click.echo(out)
