"""`nx.Engine`: a request queue in front of one `NxModel`, stepped by a background thread.

INTERIM implementation: one worker thread runs queued requests one at a time through
`NxModel.stream` (real compute; every row of the batch carries the same prompt and row 0 is the
answer). It implements exactly the interface the continuous-batching engine will have, so that
`nx serve` can be built and tested against it now; the continuous-batching engine replaces this
module whole.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import threading
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import Any

import numpy as np

from nx.errors import BucketError, InputError, NxError, ResourceError
from nx.generation import SamplingParams, normalize_stop


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

    def __init__(self, engine: Engine, prompt_ids: list[int], options: dict[str, Any]) -> None:
        self.id = uuid.uuid4().hex
        self.prompt_tokens = len(prompt_ids)
        self.tokens: list[int] = []
        self.finish_reason: str | None = None
        self.error: BaseException | None = None
        self._engine = engine
        self._prompt = prompt_ids
        self._options = options
        self._cond = threading.Condition()
        self._cancelled = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    # ---- producer side (the engine thread) ---------------------------------------------------
    def _push(self, token: int) -> None:
        with self._cond:
            self.tokens.append(token)
            self._wake()

    def _finish(self, reason: str, error: BaseException | None = None) -> None:
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
        self._engine._cancel_queued(self)

    def __repr__(self) -> str:
        return f"Request(id={self.id!r}, prompt_tokens={self.prompt_tokens}, tokens={len(self.tokens)}, finish_reason={self.finish_reason!r})"


class Engine:
    """Runs submitted requests on `model` from a background thread; `submit` never blocks on compute."""

    def __init__(self, model: Any, *, max_queue: int = 256) -> None:
        if not isinstance(max_queue, int) or max_queue < 1:
            raise InputError(f"max_queue must be a positive int, got {max_queue!r}")
        self.model = model
        self.max_queue = max_queue
        self._queue: collections.deque[Request] = collections.deque()
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._running: Request | None = None
        self._generated = 0
        self._finished = 0

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> Engine:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="nx-engine", daemon=True)
                self._thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Accept no more requests; with `drain` finish the running and queued ones (cancelling
        whatever is left after `timeout` seconds), else cancel them all now."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if not drain:
            self._cancel_all()
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            if thread.is_alive():
                self._cancel_all()
                thread.join()
        else:
            self._cancel_all()

    def _cancel_all(self) -> None:
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
            running = self._running
            self._finished += len(queued)
        for req in queued:
            req._cancelled = True
            req._finish("cancelled")
        if running is not None:
            running._cancelled = True

    # ---- requests ----------------------------------------------------------------------------
    def submit(
        self,
        prompt_ids: Sequence[int],
        *,
        max_new_tokens: int = 16,
        min_new_tokens: int = 0,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        stop: Sequence[Sequence[int]] | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        ignore_eos: bool = False,
    ) -> Request:
        """Queue a request and return it at once. Checks it first, so that bad input fails here:
        `InputError` (ids, lengths, sampling values), `BucketError` (does not fit the model's
        positions), `QueueFullError`, `EngineClosedError`. ``temperature == 0`` is greedy."""
        cfg, vocab = self.model.config, self.model.spec.vocab_size
        ids = [int(t) for t in prompt_ids]
        if not ids:
            raise InputError("the prompt is empty; give at least one token")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise InputError(f"token id {bad[0]} is outside the vocabulary [0, {vocab})")
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not isinstance(min_new_tokens, int) or not 0 <= min_new_tokens <= max_new_tokens:
            raise InputError(f"min_new_tokens must be an int in [0, max_new_tokens], got {min_new_tokens!r}")
        if len(ids) >= cfg.max_positions:
            raise BucketError(
                f"a prompt of {len(ids)} tokens leaves no room to generate in the largest n_positions bucket "
                f"{cfg.max_positions}; shorten it or load the model with a larger n_positions"
            )
        if len(ids) + max_new_tokens > cfg.max_positions:
            raise BucketError(
                f"a prompt of {len(ids)} tokens plus max_new_tokens={max_new_tokens} needs "
                f"{len(ids) + max_new_tokens} positions but the largest n_positions bucket is {cfg.max_positions}; "
                "lower max_new_tokens"
            )
        if temperature is None or not isinstance(temperature, (int, float)) or temperature < 0:
            raise InputError(f"temperature must be a number >= 0 (0 is greedy), got {temperature!r}")
        sample = temperature > 0
        SamplingParams(sample, temperature if sample else 1.0, top_k, top_p, repetition_penalty, seed).validated()
        options = dict(
            max_new_tokens=max_new_tokens,
            min_new_tokens=min_new_tokens,
            do_sample=sample,
            temperature=float(temperature) if sample else 1.0,
            top_k=top_k,
            top_p=float(top_p),
            repetition_penalty=float(repetition_penalty),
            seed=seed,
            stop=normalize_stop(stop) or None,
            eos_token_id=[] if ignore_eos else eos_token_id,
        )
        req = Request(self, ids, options)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down and accepts no more requests")
            if len(self._queue) >= self.max_queue:
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later", 1.0)
            self._queue.append(req)
            self._lock.notify_all()
        return req

    def _cancel_queued(self, req: Request) -> None:
        with self._lock:
            try:
                self._queue.remove(req)
            except ValueError:
                return  # running (the loop sees the flag) or already finished
            self._finished += 1
        req._finish("cancelled")

    def stats(self) -> dict:
        with self._lock:
            return {
                "queued": len(self._queue),
                "running": int(self._running is not None),
                "batch_size": self.model.config.batch_size,
                "generated_tokens": self._generated,
                "finished": self._finished,
            }

    # ---- the worker thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._queue or self._closed)
                if not self._queue:
                    return  # closed and drained
                req = self._queue.popleft()
                self._running = req
            try:
                self._run(req)
            finally:
                with self._lock:
                    self._running = None
                    self._finished += 1

    def _run(self, req: Request) -> None:
        """Generate `req` to its end: EOS or stop sequence ("stop"), max_new_tokens ("length"),
        cancel ("cancelled"), or an exception ("error", kept in `req.error`)."""
        if req._cancelled:
            req._finish("cancelled")
            return
        opts = dict(req._options)
        stops = opts["stop"] or []
        model = self.model
        eos = set(model._eos_ids(opts["eos_token_id"]).tolist())
        rows = np.tile(np.asarray([req._prompt], np.int64), (model.config.prompt_batch_size, 1))
        steps = model.stream(rows, **opts)
        try:
            for host in steps:
                token = int(host[0])
                req._push(token)
                with self._lock:
                    self._generated += 1
                if token in eos:  # min_new_tokens is enforced in the program (EOS suppressed)
                    req._finish("stop")
                    return
                if any(len(req.tokens) >= len(s) and tuple(req.tokens[-len(s) :]) == s for s in stops):
                    req._finish("stop")
                    return
                if req._cancelled:
                    req._finish("cancelled")
                    return
            req._finish("length")
        except Exception as exc:  # noqa: BLE001 - reported on the request, the engine goes on
            req._finish("error", exc)
        finally:
            steps.close()
