"""``nx generate``: text from a prompt, streamed."""

from __future__ import annotations

import sys
from typing import Any

import click

from nx.cli import from_cache, load_kwargs, main, model_options


@main.command()
@click.argument("target")
@click.argument("path", required=False)
@click.option("--prompt", "-p", required=True, help="Text to continue (or the user message with --chat).")
@click.option("--chat", is_flag=True, help="Wrap the prompt in the tokenizer's chat template.")
@click.option("--max-new-tokens", "-n", default=64, show_default=True, type=int)
@model_options()
@click.option("--temperature", type=float, default=None, help="Sample with this temperature (default: greedy).")
@click.option("--top-k", type=int, default=None, help="Sample from the k most likely tokens.")
@click.option("--top-p", type=float, default=None, help="Sample from the smallest set with this probability mass.")
@click.option("--repetition-penalty", type=float, default=1.0, show_default=True)
@click.option("--seed", type=int, default=None, help="Seed for reproducible sampling.")
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
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    seed: int | None,
    num_processes: int,
    **load: Any,
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
    model = nx.load(*args, **load_kwargs(**load), compile=False)  # only this request's programs compile, below
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
        loaded += f" | compile {built} programs {compile_s:.1f}s{from_cache(model)}"
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
