"""``nx chat``: an interactive conversation in the terminal (like ``llama-cli -cnv`` or ``ollama run``)."""

from __future__ import annotations

import contextlib
from typing import Any

import click

from nx.cli import (
    chat_ids,
    load_kwargs,
    load_model,
    main,
    model_options,
    quiet_option,
    sampling_options,
    sampling_params,
    text_tokenizer,
)
from nx.errors import BucketError, NxError

EXIT = ("/exit", "/quit", "/bye")
RESET = ("/reset", "/clear")
HELP = "type a message and press Enter; /reset starts a new conversation, /exit (or Ctrl-D) quits"


def reply(model: Any, tok: Any, messages: list[dict], max_new_tokens: int, knobs: Any, quiet: bool) -> str:
    """Stream the assistant's answer to the conversation so far to stdout and return its text.

    The whole conversation is encoded again each turn (simple, and always what the template says);
    the answer is cut to the positions left, and Ctrl-C ends it early, keeping what was said."""
    import dataclasses

    from nx.serve.text import Detokenizer

    ids = chat_ids(tok, messages)
    room = model.config.max_positions - len(ids)
    if room < 1:
        raise BucketError(
            f"the conversation is {len(ids)} tokens, which fills the model's {model.config.max_positions} positions; "
            "/reset to start a new one, or load the model with a larger --n-positions"
        )
    new = min(max_new_tokens, room)
    model.compile(progress=not quiet, shapes=model.request_shapes(len(ids), new, knobs.do_sample))
    detok = Detokenizer(tok)  # never splits a character, never shows special tokens
    try:
        for step in model.stream([ids], max_new_tokens=new, **dataclasses.asdict(knobs)):
            click.echo(detok.push(int(step[0])), nl=False)
    except KeyboardInterrupt:
        pass
    click.echo(detok.flush())
    return tok.decode(detok.ids, skip_special_tokens=True)


@main.command()
@click.argument("target")
@click.argument("path", required=False)
@click.option("--system", "-s", default=None,
              help="System prompt: the first message of every conversation (kept by /reset).")
@sampling_options
@model_options()
@quiet_option
def chat(
    target: str,
    path: str | None,
    system: str | None,
    max_new_tokens: int,
    temperature: float | None,
    top_k: int | None,
    top_p: float | None,
    repetition_penalty: float,
    seed: int | None,
    quiet: bool,
    **load: Any,
) -> None:
    """Chat with a model in the terminal: ``nx chat [FAMILY] PATH [--system TEXT]``.

    Each message you type is added to the conversation, which is formatted with the tokenizer's
    chat template, and the answer streams back. /reset clears the conversation (keeping
    --system), /exit or Ctrl-D quits, Ctrl-C stops an answer. Sampling flags as for nx generate
    (greedy by default); programs compile as turns first need them.
    """
    knobs = sampling_params(temperature, top_k, top_p, repetition_penalty, seed)
    model = load_model(target, path, quiet, **load_kwargs(**load))
    tok = text_tokenizer(model, path or target, "chat")
    start = [{"role": "system", "content": system}] if system else []
    chat_ids(tok, [*start, {"role": "user", "content": "hi"}])  # no chat template: fail now, not at the first turn
    with contextlib.suppress(ImportError):  # not on every platform; plain input() works without it
        import readline  # noqa: F401  (line editing and the up-arrow history of input())
    if not quiet:
        click.echo(HELP, err=True)
    messages = list(start)
    while True:
        try:
            text = input(">>> ").strip()
        except (EOFError, KeyboardInterrupt):
            click.echo()
            return
        if not text:
            continue
        if text in EXIT:
            return
        if text in RESET:
            messages = list(start)
            click.echo("(conversation cleared)")
            continue
        if text.startswith("/"):
            click.echo(f"unknown command {text}: {HELP}")
            continue
        messages.append({"role": "user", "content": text})
        try:
            messages.append({"role": "assistant", "content": reply(model, tok, messages, max_new_tokens, knobs, quiet)})
        except NxError as exc:  # this turn failed; the conversation goes on without it
            messages.pop()
            click.secho(f"error: {exc}", fg="red", err=True)
