"""``nx generate``: text from one prompt (streamed) or several (one batch, each answer labelled)."""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from nx.cli import (
    encode,
    from_cache,
    load_kwargs,
    load_model,
    main,
    model_options,
    quiet_option,
    sampling_options,
    sampling_params,
    text_tokenizer,
)
from nx.errors import BucketError, InputError


def read_prompts(file: str) -> list[str]:
    """The prompts of a JSON-lines file, one ``{"prompt": "..."}`` object per line (blank lines skipped)."""
    prompts = []
    with open(file, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InputError(f"{file} line {n} is not JSON ({exc.msg}); write one {{\"prompt\": \"...\"}} per line") from exc
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise InputError(f"{file} line {n} has no \"prompt\" string; write one {{\"prompt\": \"...\"}} per line")
            prompts.append(row["prompt"])
    return prompts


def left_pad(rows: list[list[int]], pad: int) -> tuple[list[list[int]], list[list[int]]]:
    """(ids, attention_mask) of token rows left-padded with `pad` to the longest, as a tokenizer
    with ``padding_side="left"`` pads them (generation continues every row at the right end)."""
    width = max(len(r) for r in rows)
    return [[pad] * (width - len(r)) + r for r in rows], [[0] * (width - len(r)) + [1] * len(r) for r in rows]


@main.command()
@click.argument("target")
@click.argument("path", required=False)
@click.option("--prompt", "-p", "prompts", multiple=True,
              help="Text to continue (or the user message with --chat); repeat it to run several prompts as one batch.")
@click.option("--prompts-file", type=click.Path(exists=True, dir_okay=False), default=None,
              help='JSON-lines file of prompts, one {"prompt": "..."} per line, run as one batch (after any --prompt).')
@click.option("--chat", is_flag=True, help="Wrap each prompt in the tokenizer's chat template (as a user message).")
@sampling_options
@model_options()
@click.option(
    "--num-processes",
    type=int,
    default=1,
    show_default=True,
    help="Run as this many cooperating local processes (jax.distributed, gloo on CPU); use with --tp.",
)
@quiet_option
def generate(
    target: str,
    path: str | None,
    prompts: tuple[str, ...],
    prompts_file: str | None,
    chat: bool,
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    seed: int | None,
    num_processes: int,
    quiet: bool,
    **load: Any,
) -> None:
    """Generate text: ``nx generate [FAMILY] PATH --prompt ...`` (FAMILY inferred when omitted).

    One prompt streams its answer to stdout as it is produced. Several (--prompt repeated, or
    --prompts-file) run as one batch of that many rows, left-padded, and each answer is printed
    after its prompt's label; greedy answers equal those of each prompt run alone. Greedy by
    default; any of --temperature/--top-k/--top-p switches to sampling. Only the programs these
    prompts and --max-new-tokens run are compiled (or taken from the compile cache), not every
    bucket. Progress and timing go to stderr (none with --quiet); special tokens are never printed.
    """
    import dataclasses
    import time

    import numpy as np

    from nx import decoding, distributed
    from nx.progress import plural
    from nx.serve.text import Detokenizer

    texts = list(prompts) + (read_prompts(prompts_file) if prompts_file else [])
    if not texts:
        raise click.UsageError("give a prompt: --prompt TEXT (repeatable) or --prompts-file FILE.jsonl")
    if num_processes > 1 and distributed.num_processes() == 1:
        sys.exit(distributed.launch(sys.argv[1:], num_processes))
    leader = distributed.is_leader()
    knobs = sampling_params(temperature, top_k, top_p, repetition_penalty, seed)  # bad flags fail before loading
    t0 = time.perf_counter()
    sized = {"batch_size": len(texts)} if len(texts) > 1 else {}  # a batch row per prompt
    model = load_model(target, path, quiet or not leader, **sized, **load_kwargs(**load))
    built, saved = len(model.compiled_shapes), model.programs.loaded  # an artifact's programs load, not compile
    # A short prompt's programs load and take their first-call setup while the tokenizer loads
    # (most prompts are short: these are then the request's own programs).
    try:  # (not across processes: their programs must run in step)
        ahead = model.request_shapes(1, max_new_tokens, knobs.do_sample) if distributed.num_processes() == 1 else []
    except BucketError:  # reported below, for the real prompt
        ahead = []
    ahead = model.programs.prefetch(ahead, warm=True)
    tok = text_tokenizer(model, path or target, "generate")
    rows = [encode(tok, text, chat) for text in texts]
    for n, row in enumerate(rows, 1):
        if not row:
            which = "the prompt" if len(rows) == 1 else f"prompt {n}"
            raise InputError(f"{which} is empty; pass some text with --prompt")
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    width = max(len(r) for r in rows)
    model.compile(progress=not quiet and leader, shapes=model.request_shapes(width, max_new_tokens, knobs.do_sample))
    ahead.join()  # its warm-up runs wrote placeholders into the cache: done before the request starts
    compile_s = time.perf_counter() - t1
    eos = decoding.eos_ids(model, None)
    ids, mask = left_pad(rows, int(tok.pad_token_id if tok.pad_token_id is not None else (eos[0] if eos.size else 0)))
    single = len(rows) == 1
    detok = Detokenizer(tok) if single and leader else None  # never splits a character, never shows special tokens
    new, t2, t_first = [], time.perf_counter(), None
    for host in model.stream(ids, attention_mask=mask, max_new_tokens=max_new_tokens, **dataclasses.asdict(knobs)):
        t_first = t_first or time.perf_counter()
        new.append(host)
        if detok is not None:
            click.echo(detok.push(int(host[0])), nl=False)
    decode_s = time.perf_counter() - (t_first or t2)
    saved = model.programs.loaded - saved
    built = len(model.compiled_shapes) - built - saved
    if not leader:
        return
    if single:
        click.echo(detok.flush())
    else:
        for n, (text, seq) in enumerate(zip(texts, np.stack(new, 1).tolist()), 1):
            ends = [i for i, t in enumerate(seq) if t in eos]
            answer = tok.decode(seq[: ends[0]] if ends else seq, skip_special_tokens=True)
            click.echo(f"[{n}/{len(texts)}] {text}\n{answer}\n")
    if quiet:
        return
    steps = len(new) - 1
    rate = steps * len(rows) / decode_s if steps > 0 and decode_s > 0 else float("nan")
    loaded = f"load {load_s:.1f}s"
    if built:
        loaded += f" | compile {plural(built, 'program')} {compile_s:.1f}s{from_cache(model)}"
    elif saved:
        loaded += f" | load {plural(saved, 'saved program')} {compile_s:.1f}s"
    batch = "" if single else f"{len(rows)} prompts | "
    click.echo(
        f"[{loaded} | {batch}prompt {width} tokens | new {len(new)} tokens | "
        f"first token {((t_first or t2) - t2) * 1000:.0f} ms | decode {rate:.1f} tokens/s]",
        err=True,
    )
