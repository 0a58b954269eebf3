"""`nx.Engine`: one model shared by many callers, with continuous batching.

`submit` checks a request and queues it (bounded); a background thread admits queued requests
into free batch rows at every step (`ContinuousBatch.insert`), steps every active row together
(`ContinuousBatch.step`), hands each request its tokens as they come, and frees a row as soon as
its request ends (EOS, a stop sequence, max_new_tokens, cancel). Thread-safe; `submit` never waits
for compute. A `NxModel.generate` on another thread waits until the engine holds no rows.
"""

from __future__ import annotations

import collections
import threading
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from nx import decoding
from nx.batch import ContinuousBatch
from nx.errors import InputError, ResourceError
from nx.generation import hits_stop
from nx.model import NxModel
from nx.request import EngineClosedError, QueueFullError, Request, check_options

__all__ = ["Engine", "EngineClosedError", "QueueFullError", "Request"]


class Engine:
    """Runs submitted requests on `model`, each in its own batch row, from a background thread."""

    def __init__(self, model: NxModel, *, max_queue: int = 256) -> None:
        if not isinstance(max_queue, int) or isinstance(max_queue, bool) or max_queue < 1:
            raise InputError(f"max_queue must be a positive int, got {max_queue!r}")
        self.model, self.max_queue = model, max_queue
        self.batch = ContinuousBatch(model.programs, model.config)
        self._queue: collections.deque[Request] = collections.deque()
        self._rows: dict[int, Request] = {}  # active row -> its request (engine thread only)
        self._eos: dict[int, np.ndarray] = {}
        self._lock = threading.Condition()
        self._thread: threading.Thread | None = None
        self._closed = False
        self._generated = 0
        self._finished = 0
        self._step_s = 0.05  # a running estimate of one step, for Retry-After

    # ---- lifecycle ---------------------------------------------------------------------------
    def program_keys(self, sample: bool = False):
        """The programs requests run (compile them before serving: `NxModel.compile(shapes=...)`)."""
        return self.batch.program_keys(sample)

    def start(self) -> Engine:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._loop, name="nx-engine", daemon=True)
                self._thread.start()
        return self

    def shutdown(self, drain: bool = True, timeout: float | None = None) -> None:
        """Accept no more requests; with `drain`, finish the running and queued ones (cancelling
        whatever is left after `timeout` seconds), else cancel them all now."""
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if not drain:
            self._cancel_all()
        thread = self._thread
        if thread is None:
            self._cancel_all()
            return
        thread.join(timeout)
        if thread.is_alive():
            self._cancel_all()
            thread.join()

    def _cancel_all(self) -> None:
        with self._lock:
            queued, self._queue = list(self._queue), collections.deque()
            running = list(self._rows.values())
            self._finished += len(queued)
        for req in queued:
            req.finish("cancelled")
        for req in running:
            req.cancel()  # the loop frees the row at its next step

    # ---- requests ----------------------------------------------------------------------------
    def submit(self, prompt_ids: Sequence[int], **options: Any) -> Request:
        """Queue a request and return its handle at once. Options: `max_new_tokens` (16),
        `min_new_tokens`, `temperature` (1.0; 0 is greedy), `top_k`, `top_p`, `repetition_penalty`,
        `seed`, `stop` (token-id sequences), `eos_token_id` (default: the model's), `ignore_eos`.
        Raises `InputError` / `BucketError` for a bad request, `QueueFullError` when the queue is
        full, `EngineClosedError` after `shutdown`."""
        cfg = self.model.config
        ids, opts = check_options(prompt_ids, self.model.spec.vocab_size, cfg, **options)
        req = Request(ids, opts, self._cancel_queued)
        with self._lock:
            if self._closed:
                raise EngineClosedError("the engine is shut down and accepts no more requests")
            if len(self._queue) >= self.max_queue:
                waits = len(self._queue) / cfg.batch_size * opts.max_new_tokens * self._step_s
                raise QueueFullError(f"the request queue is full ({self.max_queue} waiting); retry later",
                                     max(1.0, round(waits, 1)))
            self._queue.append(req)
            self._lock.notify_all()
        return req

    def _cancel_queued(self, req: Request) -> None:
        with self._lock:
            try:
                self._queue.remove(req)
            except ValueError:
                self._lock.notify_all()  # running: the loop sees the flag at its next step
                return
            self._finished += 1
        req.finish("cancelled")

    def stats(self) -> dict:
        """queued, running (active rows), batch_size, generated_tokens and finished (totals)."""
        with self._lock:
            return {"queued": len(self._queue), "running": len(self._rows), "batch_size": self.model.config.batch_size,
                    "generated_tokens": self._generated, "finished": self._finished}

    # ---- the engine thread -------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._lock:
                self._lock.wait_for(lambda: self._queue or self._rows or self._closed)
                if self._closed and not self._queue and not self._rows:
                    return
            try:
                self._drop_cancelled()
                blocked = self._admit()
                if self._rows:
                    self._step()
                elif blocked:  # a generate() on another thread holds the rows: wait for it
                    time.sleep(0.005)
            except Exception as exc:  # noqa: BLE001 - a fault ends the requests in flight, not the engine
                for row in list(self._rows):
                    self._end(row, "error", exc)

    def _drop_cancelled(self) -> None:
        for row, req in list(self._rows.items()):
            if req.cancelled:
                self._end(row, "cancelled")

    def _admit(self) -> bool:
        """Insert queued requests into free rows (one prompt each), then emit their first tokens
        (the inserts queue on the device back to back; each read waits for its own insert only);
        True when requests wait for rows."""
        inserted, firsts, waiting = [], [], False
        while True:
            with self._lock:
                if not self._queue:
                    break
                try:
                    row = self.model.kv.acquire(1)[0]
                except ResourceError:  # every row is busy (ours, or a generate() on another thread)
                    waiting = True
                    break
                req = self._queue.popleft()
            self._rows[row] = req
            self._eos[row] = decoding.eos_ids(self.model, req.options.eos_token_id)
            if req.options.min_new_tokens > 0:
                self.batch.suppress(row, self._eos[row])
            firsts.append(self.batch.insert(row, req.prompt, req.options.sampling))
            inserted.append(row)
        for row, first in zip(inserted, firsts):
            self._emit(row, int(self.model.host(first)[0]))
        return waiting

    def _step(self) -> None:
        t0 = time.perf_counter()
        tokens = self.model.host(self.batch.step())
        self._step_s = 0.9 * self._step_s + 0.1 * (time.perf_counter() - t0)
        for row in list(self._rows):
            self._emit(row, int(tokens[row]))

    def _emit(self, row: int, token: int) -> None:
        """Hand `token` to the row's request and end it if it is done."""
        req, opts = self._rows[row], self._rows[row].options
        req.push(token)
        with self._lock:
            self._generated += 1
        n = len(req.tokens)
        self.batch.tokens[row] = token
        if n == opts.min_new_tokens and opts.min_new_tokens > 0:
            self.batch.suppress(row, None)  # EOS may come from now on
        if token in self._eos[row] or (opts.stop and hits_stop(req.tokens, list(opts.stop))):
            self._end(row, "stop")
        elif n >= opts.max_new_tokens:
            self._end(row, "length")
        elif req.cancelled:
            self._end(row, "cancelled")

    def _end(self, row: int, reason: str, error: BaseException | None = None) -> None:
        req = self._rows.pop(row)
        self._eos.pop(row, None)
        self.batch.release(row)
        self.model.kv.release([row])
        with self._lock:
            self._finished += 1
        req.finish(reason, error)

