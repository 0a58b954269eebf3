"""One request of an `nx.Engine`: its checked options, its tokens as they come, how it ended.

`Request` is the handle `Engine.submit` returns: iterate it (``for``, or ``async for`` without
blocking the event loop), or wait with `result()`; `cancel()` frees its row within a step.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from nx import buckets
from nx.errors import InputError, NxError, ResourceError
from nx.generation import GenerationOptions, SamplingParams


@dataclass(frozen=True)
class RequestOptions:
    """How one request generates (see `check_options`); ``sampling.do_sample`` False is greedy."""

    max_new_tokens: int
    min_new_tokens: int
    sampling: SamplingParams
    stop: tuple[tuple[int, ...], ...]
    eos_token_id: int | tuple[int, ...] | None  # None: the model's; () never stops at EOS


def check_options(prompt: Sequence[int], vocab: int, config: Any, *, max_new_tokens: int = 16,
                  min_new_tokens: int = 0, temperature: float = 1.0, top_k: int | None = None, top_p: float = 1.0,
                  repetition_penalty: float = 1.0, seed: int | None = None,
                  stop: Sequence[Sequence[int]] | None = None, eos_token_id: int | Sequence[int] | None = None,
                  ignore_eos: bool = False) -> tuple[list[int], RequestOptions]:
    """The prompt as ints and the request's options, every value checked before it is queued:
    `InputError` for bad ids or settings, `BucketError` when prompt + max_new_tokens cannot fit
    `config`'s largest position bucket. ``temperature == 0`` means greedy, as in OpenAI's API."""
    try:
        ids = [int(t) for t in prompt]
    except (TypeError, ValueError) as exc:
        raise InputError(f"the prompt must be a list of token ids: {exc}") from exc
    if not ids:
        raise InputError("the prompt is empty; give at least one token")
    bad = [t for t in ids if not 0 <= t < vocab]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not temperature >= 0:
        raise InputError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
    sample = temperature > 0
    opts = GenerationOptions.check(
        max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=sample,
        temperature=float(temperature) if sample else 1.0, top_k=top_k, top_p=top_p,
        repetition_penalty=repetition_penalty, seed=seed, eos_token_id=None if ignore_eos else eos_token_id, stop=stop,
    )
    buckets.check_fits(config, len(ids), opts.max_new_tokens, f"max_new_tokens={opts.max_new_tokens}",
                       "shorten the prompt or lower max_new_tokens")
    eos = opts.eos_token_id
    eos = () if ignore_eos else (tuple(eos) if isinstance(eos, list) else eos)
    return ids, RequestOptions(opts.max_new_tokens, opts.min_new_tokens, opts.sampling, tuple(opts.stops), eos)


class QueueFullError(ResourceError):
    """`Engine.submit` found the bounded queue full; try again after `retry_after` seconds."""

    def __init__(self, message: str, retry_after: float = 1.0) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineClosedError(NxError):
    """`Engine.submit` after `Engine.shutdown`: the engine accepts no more requests."""


class Request:
    """One submitted generation: its new tokens as they are produced, and how it ended.

    Iterate it (``for``, or ``async for`` without blocking the event loop) to receive each new
    token id, or call `result()` for all of them. `cancel()` ends it early.
    """

    def __init__(self, prompt_ids: list[int], options: RequestOptions, on_cancel: Callable[[Request], None]) -> None:
        self.id = uuid.uuid4().hex
        self.prompt_tokens = len(prompt_ids)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self.prompt = prompt_ids
        self.options = options
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._cancelled = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    # ---- producer side (the engine thread) ---------------------------------------------------
    def push(self, token: int) -> None:
        """Append one new token and wake the readers (engine side)."""
        with self._cond:
            self.tokens.append(token)
            self._wake()

    def finish(self, reason: str, error: BaseException | None = None) -> None:
        """End the request (engine side); the first reason given sticks."""
        with self._cond:
            if self.finish_reason is None:
                self.finish_reason, self.error = reason, error
            self._wake()

    def _wake(self) -> None:  # holding self._cond
        self._cond.notify_all()
        for loop, event in self._waiters:
            with contextlib.suppress(RuntimeError):  # that event loop is closed; its iterator is gone
                loop.call_soon_threadsafe(event.set)

    # ---- consumer side -----------------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        i = 0
        while True:
            with self._cond:
                while len(self.tokens) <= i and not self.done:
                    self._cond.wait()
                new, finished = self.tokens[i:], self.done
            yield from new
            i += len(new)
            if finished and not new:
                return

    def __aiter__(self) -> AsyncIterator[int]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[int]:
        waiter = (asyncio.get_running_loop(), asyncio.Event())
        with self._cond:
            self._waiters.append(waiter)
        try:
            i = 0
            while True:
                waiter[1].clear()  # before looking, so a token pushed after the look sets it again
                with self._cond:
                    new, finished = self.tokens[i:], self.done
                for token in new:
                    yield token
                i += len(new)
                if not new:
                    if finished:
                        return
                    await waiter[1].wait()
        finally:
            with self._cond:
                self._waiters.remove(waiter)

    def result(self, timeout: float | None = None) -> list[int]:
        """Wait for the end (TimeoutError after `timeout` seconds) and return every new token."""
        with self._cond:
            if not self._cond.wait_for(lambda: self.done, timeout):
                raise TimeoutError(f"request {self.id} did not finish within {timeout} s")
            return list(self.tokens)

    def cancel(self) -> None:
        """Stop generating: the row is freed within a step; iteration ends, finish_reason "cancelled"."""
        self._cancelled = True
        self._on_cancel(self)

    def __repr__(self) -> str:
        return f"Request(id={self.id!r}, prompt_tokens={self.prompt_tokens}, tokens={len(self.tokens)}, finish_reason={self.finish_reason!r})"
