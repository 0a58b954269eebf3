"""The ``nx`` command line: ``nx list-models``, ``nx generate``, ``nx bench``, ``nx compile`` and ``nx cache``.

Heavy libraries (jax, torch, transformers) are imported inside commands that need them, so
``nx list-models`` stays fast.
"""

from __future__ import annotations

import sys

import click

from nx.errors import NxError


def _int_list(value: str | None) -> list[int] | int | None:
    if value is None:
        return None
    parts = [int(p) for p in value.split(",") if p.strip()]
    return parts[0] if len(parts) == 1 else parts


class _NxGroup(click.Group):
    """Turns `NxError`s into one clear line and exit code 2 instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except NxError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(2)


#: How a model is compiled: the options generate, bench and compile share (see `nx.load`).
_MODEL_OPTIONS = (
    click.option("--n-positions", default="1024", show_default=True, help="Position buckets: an int or a comma list."),
    click.option("--context-length-estimate", default=None, help="Prompt buckets: an int or a comma list."),
    click.option("--amp", default="f32", show_default=True, type=click.Choice(["f32", "bf16", "f16"])),
    click.option("--backend", default="cpu", show_default=True, help="PJRT platform: cpu, cuda, neuron."),
    click.option(
        "--quant", default=None, type=click.Choice(["s8", "s4", "f32"]),
        help="Store 2-D weights as int8 / 4-bit; f32 dequantizes a GGUF file's blocks (by default kept quantized).",
    ),
    click.option("--group-size", type=int, default=None, help="Inputs per quantization scale (s4 default 32; s8: per row)."),
    click.option(
        "--unroll", type=int, default=None,
        help="Layers per scanned block (a divisor of the layer count): faster compiles, slower CPU decode. "
        "Default: every layer unrolled.",
    ),
)


def model_options(command):
    """Add `_MODEL_OPTIONS` to a command."""
    for option in reversed(_MODEL_OPTIONS):
        command = option(command)
    return command


def _quant_config(
    quant: str | None, dequant_dtype: str | None = None, no_quantize: str | None = None, group_size: int | None = None
):
    """The `QuantizationConfig` of the --quant options (None without --quant, ``"f32"`` for --quant
    f32; its sub-options without s8 / s4 are an error)."""
    from nx.errors import ConfigError
    from nx.quant import QuantizationConfig, patterns

    if quant in (None, "f32"):
        given = [flag for flag, v in (("--dequant-dtype", dequant_dtype), ("--no-quantize", no_quantize),
                                      ("--group-size", group_size)) if v]
        if given:
            raise ConfigError(f"{' and '.join(given)} {'needs' if len(given) == 1 else 'need'} --quant s8 or s4")
        return quant
    return QuantizationConfig(quant, dequant_dtype, patterns(no_quantize), group_size)


@click.group(cls=_NxGroup)
@click.version_option(package_name="nx-core", prog_name="nx")
def main() -> None:
    """nx: LLM inference from Hugging Face checkpoints, compiled with XLA."""


def _from_cache(model) -> str:
    """" (k of n programs from the compile cache)" when the compile cache supplied any, else ""."""
    cache = model.compile_cache
    if cache is None or not cache.hits:
        return ""
    return f" ({cache.hits} of {cache.hits + cache.misses} programs from the compile cache)"


@main.command("list-models")
def list_models() -> None:
    """List installed model families and the plugins that provide them."""
    from rich.console import Console
    from rich.table import Table

    from nx.registry import default_registry

    reg = default_registry()
    table = Table(title="nx model families")
    for col in ("family", "plugin", "version", "HF model types", "description"):
        table.add_column(col)
    for fam in sorted(reg.families().values(), key=lambda f: f.name):
        table.add_row(fam.name, fam.distribution, fam.version, ", ".join(fam.model_types), fam.description)
    console = Console()
    console.print(table)
    for f in reg.failures:
        console.print(f"[yellow]skipped plugin {f.name} ({f.distribution}): {f.error}[/yellow]")
    if not reg.families():
        console.print("no families installed: pip install nx-plugin-llama (or another nx-plugin-*)")


@main.command()
@click.argument("target")
@click.argument("path", required=False)
@click.option("--prompt", "-p", required=True, help="Text to continue (or the user message with --chat).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=int)
@model_options
@click.option("--temperature", type=float, default=None, help="Sample with this temperature (default: greedy).")
@click.option("--top-k", type=int, default=None, help="Sample from the k most likely tokens.")
@click.option("--top-p", type=float, default=None, help="Sample from the smallest set with this probability mass.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
@click.option("--tp", "tp_degree", type=int, default=1, show_default=True, help="Tensor-parallel degree.")
@click.option(
    "--num-processes",
    type=int,
    default=1,
    show_default=True,
    help="Run as this many cooperating local processes (jax.distributed, gloo on CPU); use with --tp.",
)
def generate(
    target: str,
    path: str | None,
    prompt: str,
    chat: bool,
    max_new_tokens: int,
    n_positions: str,
    context_length_estimate: str | None,
    amp: str,
    backend: str,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    seed: int | None,
    tp_degree: int,
    num_processes: int,
    quant: str | None,
    group_size: int | None,
    unroll: int | None,
) -> None:
    """Generate text: ``nx generate [FAMILY] PATH --prompt ...`` (FAMILY inferred when omitted).

    Greedy by default; any of --temperature/--top-k/--top-p switches to sampling. Only the programs
    this prompt and --max-new-tokens run are compiled (or taken from the compile cache), not every
    bucket. Text streams to stdout as it is produced; timing goes to stderr.
    """
    import dataclasses
    import time

    from transformers import TextStreamer

    import nx
    from nx import distributed
    from nx.generation import SamplingParams

    if num_processes > 1 and distributed.num_processes() == 1:
        sys.exit(distributed.launch(sys.argv[1:], num_processes))
    leader = distributed.is_leader()
    t0 = time.perf_counter()
    args = (target, path) if path else (target,)
    model = nx.load(
        *args,
        n_positions=_int_list(n_positions),
        context_length_estimate=_int_list(context_length_estimate),
        amp=amp,
        backend=backend,
        tp_degree=tp_degree,
        quant=_quant_config(quant, group_size=group_size),
        unroll=unroll,
        compile=False,  # only the programs this request runs compile, below
    )
    tok = model.tokenizer
    if tok is None:
        raise nx.CheckpointError("the checkpoint ships no tokenizer; nx generate needs one to encode --prompt")
    if chat:
        if not getattr(tok, "chat_template", None):
            raise nx.InputError("--chat: this tokenizer has no chat template; drop --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True, return_dict=True)
        ids = ids["input_ids"]
    else:
        ids = tok(prompt)["input_ids"]
    if not ids:
        raise nx.InputError("the prompt is empty; pass some text with --prompt")
    streamer = TextStreamer(tok, skip_prompt=True, skip_special_tokens=True) if leader else None
    sampling = temperature is not None or top_k is not None or top_p is not None
    knobs = SamplingParams(
        sampling, 1.0 if temperature is None else temperature, top_k, 1.0 if top_p is None else top_p, repetition_penalty, seed
    ).validated()  # bad flags fail before anything compiles
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    built = len(model.compiled_shapes)  # an artifact holds its greedy programs already
    model.compile(shapes=model.request_shapes(len(ids), max_new_tokens, sampling))
    built = len(model.compiled_shapes) - built
    compile_s = time.perf_counter() - t1
    loaded = f"load {load_s:.1f}s"
    if built:
        loaded += f" | compile {built} programs {compile_s:.1f}s{_from_cache(model)}"
    out = model.generate(
        [ids],
        max_new_tokens=max_new_tokens,
        streamer=streamer,
        return_dict=True,
        **dataclasses.asdict(knobs),
    )
    if not leader:
        return
    click.echo()
    t = out.timings
    decode_s = t["total_s"] - t["first_token_s"]
    rate = (t["new_tokens"] - 1) / decode_s if t["new_tokens"] > 1 and decode_s > 0 else float("nan")
    click.echo(
        f"[{loaded} | prompt {t['prompt_tokens']} tokens | new {t['new_tokens']} tokens | "
        f"first token {t['first_token_s'] * 1000:.0f} ms | decode {rate:.1f} tokens/s]",
        err=True,
    )


@main.command()
@click.argument("target")
@click.argument("path", required=False)
@click.option("--batch-sizes", default="1,8", show_default=True, help="Comma list; one model load per batch size.")
@click.option("--prompt-lengths", default="16,128,512", show_default=True, help="Comma list of prompt lengths (random ids).")
@click.option("--new-tokens", default=128, show_default=True, type=int, help="Tokens generated per run (EOS banned).")
@model_options
@click.option("--tp-degree", default=1, show_default=True, type=int, help="Tensor-parallel degree.")
@click.option("--dequant-dtype", default=None, type=click.Choice(["f32", "bf16", "f16"]), help="int8 weights convert to this for matmuls on accelerators (default: --amp); the CPU runs int8 dots.")
@click.option("--cached-load/--no-cached-load", default=True, show_default=True,
              help="Also save a compiled artifact (model.save) to a temporary directory and time nx.load from it.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the random prompt ids.")
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON on stdout.")
def bench(
    target: str,
    path: str | None,
    batch_sizes: str,
    prompt_lengths: str,
    new_tokens: int,
    amp: str,
    n_positions: str,
    context_length_estimate: str | None,
    backend: str,
    tp_degree: int,
    quant: str | None,
    group_size: int | None,
    dequant_dtype: str | None,
    cached_load: bool,
    seed: int,
    as_json: bool,
    unroll: int | None,
) -> None:
    """Measure compile time, time to first token, decode tokens/s, latency, memory and bandwidth.

    ``nx bench [FAMILY] PATH``: prompts are random token ids, so no tokenizer is needed. Progress
    goes to stderr; the report (or JSON with --json) to stdout.
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

    options: dict = {"tp_degree": tp_degree} if tp_degree != 1 else {}
    if unroll is not None:
        options["unroll"] = unroll
    qc = _quant_config(quant, dequant_dtype, group_size=group_size)
    if qc is not None:
        options["quant"] = qc
    result = nx_bench.run(
        target,
        path,
        batch_sizes=ints(batch_sizes, "--batch-sizes"),
        prompt_lengths=ints(prompt_lengths, "--prompt-lengths"),
        new_tokens=new_tokens,
        amp=amp,
        n_positions=_int_list(n_positions),
        context_length_estimate=_int_list(context_length_estimate),
        backend=backend,
        seed=seed,
        cached_load=cached_load,
        progress=False,
        log=lambda msg: click.echo(msg, err=True),
        **options,
    )
    click.echo(json.dumps(result, indent=2) if as_json else nx_bench.format_table(result))


@main.group("cache", cls=_NxGroup)
def cache_group() -> None:
    """The on-disk cache of compiled programs (NX_CACHE_DIR, default ~/.cache/nx; NX_CACHE_DIR=off disables it)."""


def _default_cache():
    """The compile cache `nx.load` uses by default, or None (said so) when NX_CACHE_DIR=off."""
    from nx.compile_cache import ENV, CompileCache

    cache = CompileCache.from_setting(True)
    if cache is None:
        click.echo(f"the compile cache is disabled ({ENV}=off)")
    return cache


@cache_group.command("info")
def cache_info() -> None:
    """Show where the compile cache is, how many programs it holds and its size."""
    cache = _default_cache()
    if cache is not None:
        click.echo(
            f"{cache.programs_dir}: {len(cache.entries())} programs, {cache.size_bytes() / 2**20:.1f} MiB (limit "
            f"{cache.max_bytes / 2**20:.0f} MiB); {len(cache.tokenizer_dirs())} tokenizers converted from GGUF files"
        )


@cache_group.command("clear")
def cache_clear() -> None:
    """Delete every cached program and tokenizer (they are rebuilt when next needed)."""
    cache = _default_cache()
    if cache is not None:
        click.echo(f"removed {cache.clear()} programs from {cache.programs_dir}")


@main.command("compile")
@click.argument("target")
@click.argument("path", required=False)
@click.option("--out", "-o", "out", required=True, type=click.Path(file_okay=False), help="Artifact directory to write.")
@click.option("--batch-size", default=1, show_default=True, type=int)
@click.option("--prompt-batch-size", default=None, type=int, help="Prompt rows encoded once and broadcast (default: batch size).")
@model_options
@click.option("--tp", "tp_degree", default=1, show_default=True, type=int, help="Tensor-parallel degree.")
@click.option("--dequant-dtype", default=None, type=click.Choice(["f32", "bf16", "f16"]), help="int8 weights convert to this for matmuls on accelerators (default: --amp); the CPU runs int8 dots.")
@click.option("--no-quantize", default=None, help="Comma list of parameter-name patterns kept in floating point.")
@click.option("--sampling", is_flag=True, help="Also compile the sampling variant of every program.")
@click.option("--dump-hlo", default=None, type=click.Path(file_okay=False), help="Also write each program's HLO (text + .pb) here.")
@click.option("--workers", default=None, type=int, help="Programs compiled in parallel threads (default: min(4, CPUs)).")
def compile_cmd(
    target: str,
    path: str | None,
    out: str,
    batch_size: int,
    prompt_batch_size: int | None,
    n_positions: str,
    context_length_estimate: str | None,
    amp: str,
    backend: str,
    tp_degree: int,
    quant: str | None,
    group_size: int | None,
    dequant_dtype: str | None,
    no_quantize: str | None,
    sampling: bool,
    dump_hlo: str | None,
    workers: int | None,
    unroll: int | None,
) -> None:
    """Compile every bucket and save a servable artifact: ``nx compile [FAMILY] PATH --out DIR``.

    ``nx generate DIR`` (or ``nx.load(DIR)``) then starts without the checkpoint and without compiling.
    """
    import time
    from pathlib import Path

    import nx
    from nx import artifacts
    from nx.xla_options import default_workers

    qc = _quant_config(quant, dequant_dtype, no_quantize, group_size)
    t0 = time.perf_counter()
    args = (target, path) if path else (target,)
    model = nx.load(
        *args,
        batch_size=batch_size,
        prompt_batch_size=prompt_batch_size,
        n_positions=_int_list(n_positions),
        context_length_estimate=_int_list(context_length_estimate),
        amp=amp,
        backend=backend,
        tp_degree=tp_degree,
        quant=qc,
        unroll=unroll,
        compile=False,
    )
    if dump_hlo:
        model.dump_to = dump_hlo
    t1 = time.perf_counter()
    n_workers = workers or default_workers()
    artifacts.save(model, out, sampling=sampling, workers=n_workers)
    t2 = time.perf_counter()
    size = sum(f.stat().st_size for f in Path(out).rglob("*") if f.is_file())
    click.echo(
        f"compiled {len(model.compiled_shapes)} programs into {out} ({size / 2**20:.1f} MiB) | load {t1 - t0:.1f}s | "
        f"compile+save {t2 - t1:.1f}s ({n_workers} workers){_from_cache(model)}" + (f" | HLO in {dump_hlo}" if dump_hlo else ""),
        err=True,
    )
    click.echo(out)


if __name__ == "__main__":
    main()
