"""Host-side generation loops over a `Session`: `generate`, `stream`, next-token logits and
teacher forcing, with Hugging Face's knob names and every input checked before any program runs.

These functions see a model only through `Generates` (config, spec, HF config, sessions, host
copies), never its params, mesh or programs.
"""

from __future__ import annotations

import functools
import inspect
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from nx import buckets, inputs
from nx.config import RuntimeConfig
from nx.errors import InputError
from nx.generation import GenerationOptions, SamplingParams, hits_stop
from nx.session import Prompt, Session
from nx.spec import ModelSpec


class Generates(Protocol):
    """What the loops need of a model (`nx.NxModel` provides it)."""

    config: RuntimeConfig
    spec: ModelSpec
    hf_config: Any

    def session(self, prompt: Prompt, sampling: SamplingParams) -> Session: ...

    def host(self, a: Any) -> np.ndarray: ...

    def put(self, a: Any) -> Any: ...


@dataclass
class GenerateOutput:
    """`sequences` ``[batch, prompt + new]`` (torch.long), raw per-step `scores` if asked, timings."""

    sequences: Any
    scores: list[np.ndarray] | None = None
    timings: dict[str, float] = field(default_factory=dict)


# ---- inputs -----------------------------------------------------------------------------------
def prepare(model: Generates, input_ids: Any, attention_mask: Any) -> Prompt:
    """Checked prompt rows (`nx.inputs.prompts`: the compiled batch, 0/1 left padding, ids in the
    vocabulary) that fit the largest position bucket."""
    knob = "prompt_batch_size" if model.config.broadcast > 1 else "batch_size"
    ids, pad = inputs.prompts(input_ids, attention_mask, model.spec.vocab_size, model.config.prompt_batch_size, knob)
    buckets.check_fits(model.config, ids.shape[1])
    return Prompt(ids, pad)


def eos_ids(model: Generates, eos: int | Sequence[int] | None) -> np.ndarray:
    """The EOS ids given, else the HF config's, else none."""
    if eos is None and model.hf_config is not None:
        eos = getattr(model.hf_config, "eos_token_id", None)
    if eos is None:
        return np.zeros(0, np.int64)
    return np.atleast_1d(np.asarray(eos, np.int64))


def pad_id(model: Generates, pad: int | None, eos: np.ndarray) -> int:
    """The id finished rows are padded with: given, else the HF config's, else the first EOS, else 0."""
    if pad is None and model.hf_config is not None:
        pad = getattr(model.hf_config, "pad_token_id", None)
    if pad is None:
        pad = int(eos[0]) if eos.size else 0
    return int(pad)


# ---- loops ------------------------------------------------------------------------------------
def steps(
    model: Generates,
    input_ids: Any,
    attention_mask: Any = None,
    max_new_tokens: int = 32,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = 50,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    pad_token_id: int | None = None,
    stop: Sequence[int] | Sequence[Sequence[int]] | None = None,
    decode_steps: int | None = None,
) -> Iterator[tuple[np.ndarray, Any]]:
    """Each step's new tokens ``[batch]`` on the host (finished rows padded) and its logits.

    With `decode_steps` k > 1 (default: the model's ``decode_steps``) one program call runs up to
    k decode steps (`Session.steps`), so tokens reach the host k at a time and the logits are None;
    the tokens are those k = 1 chooses (each step runs as a one-step call would, the same seed
    draws the same tokens), and tokens after a row's EOS or stop sequence are padded as with k = 1."""
    opts = GenerationOptions.check(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
        top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, eos_token_id=eos_token_id,
        pad_token_id=pad_token_id, stop=stop, decode_steps=decode_steps,
    )
    sp, max_new_tokens, min_new_tokens = opts.sampling, opts.max_new_tokens, opts.min_new_tokens
    prompt = prepare(model, input_ids, attention_mask)
    buckets.check_fits(model.config, prompt.length, max_new_tokens, f"max_new_tokens={max_new_tokens}",
                       "lower max_new_tokens (--max-new-tokens)")
    eos = eos_ids(model, opts.eos_token_id)
    fill = pad_id(model, opts.pad_token_id, eos)
    stops = opts.stops
    vocab = model.spec.vocab_size
    ban = np.zeros((model.config.batch_size, vocab), bool)
    ban[:, eos[(eos >= 0) & (eos < vocab)]] = True
    ban_eos, no_ban = model.put(ban), model.put(np.zeros_like(ban))

    b = model.config.batch_size
    done = np.zeros(b, bool)
    rows: list[list[int]] = [[] for _ in range(b)]
    k = opts.decode_steps or getattr(model.config, "decode_steps", 1)
    with model.session(prompt, sp) as session:
        tokens, logits = session.start(ban_eos if min_new_tokens > 0 else None)
        if k > 1:
            yield from _blocks(model, session, tokens, k, max_new_tokens, min_new_tokens, ban_eos, eos, fill, stops)
            return
        for t in range(max_new_tokens):
            # Queue step t+1 before waiting for step t's tokens: it reads them on the device, so its
            # dispatch and this loop's host work overlap step t (one extra step when rows finish early).
            queued = None
            if t + 1 < max_new_tokens:
                queued = session.step(tokens, ban_eos if t + 1 < min_new_tokens else no_ban)
            host = np.where(done, fill, model.host(tokens))
            yield host, logits
            if queued is not None:
                tokens, logits = queued
            if _all_done(host, done, rows, eos, stops):
                return


def _all_done(host: np.ndarray, done: np.ndarray, rows: list[list[int]], eos: np.ndarray, stops: list) -> bool:
    """Mark the rows whose token `host` is an EOS or completes a stop sequence (`rows` keeps each
    row's tokens for that) as `done`, in place; True once every row is."""
    done |= np.isin(host, eos)
    if stops:
        for r, token in enumerate(host):
            rows[r].append(int(token))
            done[r] |= hits_stop(rows[r], stops)
    return bool(done.all())


def _blocks(model: Generates, session: Session, first: Any, k: int, max_new_tokens: int, min_new_tokens: int,
            eos_mask: Any, eos: np.ndarray, fill: int, stops: list) -> Iterator[tuple[np.ndarray, None]]:
    """The loop of `steps` with k decode steps per program call: block j+1 is queued (fed block
    j's last tokens on the device) before block j is read, so the host's work overlaps the device's;
    the device stops a block once every row has met EOS, so the block queued past the end is free."""
    b = model.config.batch_size
    done = np.zeros(b, bool)
    rows: list[list[int]] = [[] for _ in range(b)]
    on_device_done = model.put(np.zeros(b, bool))
    current, width = first, 1  # the block in hand (on the device) and how many of its tokens are real
    feed, left, made = first, max_new_tokens - 1, 1  # made: tokens chosen or queued so far
    while True:
        queued = None
        if left > 0:
            out, feed, on_device_done, n = session.steps(feed, k, left, eos_mask, min_new_tokens - made, on_device_done)
            queued, left, made = (out, n), left - n, made + n
        block = model.host(current).reshape(b, -1)
        for j in range(width):
            host = np.where(done, fill, block[:, j])
            yield host, None
            if _all_done(host, done, rows, eos, stops):
                return
        if queued is None:
            return
        current, width = queued


def generate(model: Generates, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 32, *,
             streamer: Any = None, output_scores: bool = False, return_dict: bool = False, **kwargs: Any):
    """`NxModel.generate` (see there): a ``torch.LongTensor [batch, prompt + new]`` or a `GenerateOutput`."""
    import torch

    check_options(generate, kwargs)
    GenerationOptions.check(max_new_tokens=max_new_tokens, streamer=streamer, output_scores=output_scores,
                            return_dict=return_dict, **kwargs)  # before the streamer sees the prompt
    prompt = inputs.token_array(input_ids, "input_ids")
    rep = model.config.broadcast
    if streamer is not None:
        streamer.put(torch.as_tensor(np.repeat(prompt, rep, axis=0)))
    t0 = time.perf_counter()
    new, scores, t_first = [], [], None
    if output_scores:
        kwargs["decode_steps"] = 1  # scores are every step's logits: one step per call
    for host, logits in steps(model, input_ids, attention_mask, max_new_tokens, **kwargs):
        t_first = t_first or time.perf_counter()
        new.append(host)
        if output_scores:
            scores.append(model.host(logits))
        if streamer is not None:
            streamer.put(torch.as_tensor(host, dtype=torch.long))
    t_end = time.perf_counter()
    if streamer is not None:
        streamer.end()
    seq = torch.as_tensor(np.concatenate([np.repeat(prompt, rep, axis=0), np.stack(new, 1)], 1), dtype=torch.long)
    if not return_dict:
        return seq
    timings = {"first_token_s": t_first - t0, "total_s": t_end - t0, "new_tokens": len(new),
               "prompt_tokens": prompt.shape[1]}
    return GenerateOutput(seq, scores if output_scores else None, timings)


def stream(model: Generates, input_ids: Any, attention_mask: Any = None, **kwargs: Any) -> Iterator[np.ndarray]:
    """`NxModel.stream`: each step's new tokens ``[batch]`` as soon as they exist."""
    check_options(stream, kwargs)
    for host, _ in steps(model, input_ids, attention_mask, **kwargs):
        yield host


def logits(model: Generates, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
    """Next-token logits ``[batch, vocab]`` (f32) after the prompt: one prefill."""
    with model.session(prepare(model, input_ids, attention_mask), SamplingParams()) as session:
        return model.host(session.start()[1])


def forced_logits(model: Generates, input_ids: Any, continuation: Any, attention_mask: Any = None) -> np.ndarray:
    """Teacher forcing: logits ``[batch, n + 1, vocab]`` after the prompt and after each of the `n`
    tokens of `continuation` ``[batch, n]``, fed one decode step at a time."""
    prompt = prepare(model, input_ids, attention_mask)
    cont = inputs.token_array(continuation, "continuation")
    inputs.check_vocabulary(cont, model.spec.vocab_size, "continuation")
    if cont.shape[0] != model.config.batch_size:
        raise InputError(f"continuation has {cont.shape[0]} rows but the model decodes batch_size={model.config.batch_size}")
    buckets.check_fits(model.config, prompt.length, cont.shape[1], f"a continuation of {cont.shape[1]} tokens",
                       "shorten it")
    with model.session(prompt, SamplingParams()) as session:
        _, out = session.start()
        out = [model.host(out)]
        for t in range(cont.shape[1]):
            out.append(model.host(session.step(cont[:, t].astype(np.int32))[1]))
    return np.stack(out, axis=1)


def check_options(method: Callable, kwargs: dict) -> None:
    """Name the options `generate` / `stream` do not take (HF users pass ``num_beams`` and the
    like) instead of failing with a bare TypeError."""
    unknown = sorted(set(kwargs) - _options(method))
    if unknown:
        raise InputError(
            f"{method.__name__}() does not take {', '.join(unknown)}; its options are "
            f"{', '.join(sorted(_options(method)))}. Beam search and transformers' other generation "
            "strategies run on nx through nx.hf.HuggingFaceGenerationModelAdapter"
        )


@functools.cache
def _options(method: Callable) -> frozenset[str]:
    """The keyword options `method` takes itself or passes on to `steps`."""
    names = set(inspect.signature(method).parameters) | set(inspect.signature(steps).parameters)
    return frozenset(names - {"model", "input_ids", "attention_mask", "kwargs"})
