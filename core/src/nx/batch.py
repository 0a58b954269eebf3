"""`ContinuousBatch`: the rows of one model's batch, each at its own position, for requests that
join and leave at every step (continuous batching, as JetStream's insert/generate and vLLM do).

`admit` gives a free row a prompt; every `step` feeds each active row its next token and, while
admitted prompts wait, encodes the next chunk of the oldest one in the same program call (an
insert program, `nx.buckets.ProgramKey`), so no row stalls while prompts are encoded and a
prompt's first token comes out of the step that encodes its last chunk, on the device with the
others (chunked prefill interleaved with decode, one chunk per step, as vLLM schedules it). Each
row carries its own sampling settings, so greedy and sampled requests share one step, and a
row's tokens never depend on its neighbours: every step is a serving program (`nx.buckets.
ProgramKey` with `insert`), whose products are shared by all its tokens in the formulation that
rounds each token alike beside any others (`nx.ops.rows`), so a decode row gets the same bits
whether or not a chunk is encoded beside it.
"""

from __future__ import annotations

import collections
from collections.abc import Iterator

import jax
import numpy as np

from nx import buckets, decoder
from nx.buckets import ProgramKey
from nx.config import RuntimeConfig
from nx.generation import SamplingParams
from nx.programs import ProgramSet
from nx.sampling import SamplingInputs
from nx.session import row_keys


class ContinuousBatch:
    """Per-row positions, tokens and sampling state of a batch of independent requests."""

    def __init__(self, programs: ProgramSet, config: RuntimeConfig) -> None:
        self.programs, self.config = programs, config
        b, v = config.batch_size, programs.spec.vocab_size
        self._put = programs.placement.put
        self.active = np.zeros(b, bool)
        self.slots = np.zeros(b, np.int32)  # the position each row's next fed token is written to
        self.tokens = np.zeros(b, np.int32)  # the token each row is fed next
        self._sample = np.zeros(b, bool)
        self._temperature = np.zeros(b, np.float32)
        self._top_k = np.zeros(b, np.int32)
        self._top_p = np.ones(b, np.float32)
        self._penalty = np.ones(b, np.float32)
        self._keys = row_keys(0, b)
        self._suppress = np.zeros((b, v), bool)
        self._suppress_dev = self._put(self._suppress)
        self._seen = self._put(np.zeros((b, v), bool))  # carried from call to call on the device
        #: admitted rows whose prompts are not fully encoded: row -> (prompt, its remaining chunks)
        self._pending: collections.OrderedDict[int, tuple[np.ndarray, Iterator[tuple[int, int, int]]]] = (
            collections.OrderedDict())

    def program_keys(self, sample: bool = False) -> list[ProgramKey]:
        """Every program `step` can run: an insert per prompt chunk shape and window, a decode step
        per position bucket (compile them before serving, so no request waits for XLA)."""
        return buckets.serving_keys(self.config, sample)

    def _sampling(self) -> SamplingInputs:
        put = self._put
        return SamplingInputs(put(np.where(self._sample, self._temperature, 0).astype(np.float32)), put(self._top_k),
                              put(self._top_p), put(self._penalty), self._seen, self._suppress_dev, put(self._keys))

    def suppress(self, row: int, tokens: np.ndarray | None) -> None:
        """Tokens row `row` may not choose from now on (EOS before min_new_tokens); None: none."""
        self._suppress[row] = False
        if tokens is not None and tokens.size:
            self._suppress[row, tokens] = True
        self._suppress_dev = self._put(self._suppress)

    def admit(self, row: int, prompt: list[int], sp: SamplingParams) -> None:
        """Give free batch row `row` the prompt of a new request; the steps that follow encode it
        (oldest admitted first, one chunk per step) and the one encoding its last chunk returns
        its first new token."""
        self._sample[row] = sp.do_sample
        self._temperature[row] = sp.temperature
        self._top_k[row] = sp.top_k or 0
        self._top_p[row] = sp.top_p
        self._penalty[row] = sp.repetition_penalty
        self._keys[row] = row_keys(sp.seed_or_random(), 1)[0]
        ids = np.asarray(prompt, np.int32)
        self._pending[row] = (ids, buckets.prompt_chunks(self.config, len(ids)))

    @property
    def pending(self) -> list[int]:
        """Admitted rows whose prompts are still being encoded, oldest first."""
        return list(self._pending)

    def step(self) -> tuple[jax.Array, list[int]]:
        """Feed every active row its next token (`tokens`) and, if prompts wait, encode the oldest
        one's next chunk in the same call. Returns the next tokens ``[batch]`` on the device and
        the rows that produced one: the active rows, and the admitted row whose prompt this step
        finished (it is active from now on). Free rows compute along on placeholders, ignored."""
        active = self.active
        slots = np.where(active, self.slots, 0).astype(np.int32)
        put, b = self._put, self.config.batch_size
        decode = np.where(active, self.tokens, 0).astype(np.int32)
        if not self._pending:
            window = buckets.decode_window(self.config, int(slots.max()))
            inp = decoder.StepInputs(put(decode[:, None]), put(slots), put(np.zeros(b, np.int32)), put(np.int32(0)),
                                     put(np.int32(0)))
            key = ProgramKey(b, 0, window, bool((self._sample & active).any()), True)
            tokens, _, self._seen = self.programs.run(key, inp, self._sampling())
            rows = list(np.flatnonzero(active))
            self.slots[active] += 1
            return tokens, rows
        row = next(iter(self._pending))
        ids, chunks = self._pending[row]
        start, c, chunk_window = next(chunks)
        length = len(ids)
        final = start + c >= length
        chunk = np.zeros((b + 1, c), np.int32)  # rows 0..b-1: decode tokens (column 0); row b: the chunk
        chunk[:b, 0] = decode
        n = min(c, length - start)
        chunk[b, :n] = ids[start : start + n]
        slots[row] = start  # the row's placeholder decode token is written where its chunk overwrites it
        window = buckets.insert_window(self.config, chunk_window, int(np.where(active, self.slots, 0).max()))
        last = (length - 1 - start) if final else c - 1
        inp = decoder.StepInputs(put(chunk), put(np.append(slots, np.int32(start))), put(np.zeros(b + 1, np.int32)),
                                 put(np.int32(last)), put(np.int32(row)))
        sample = bool((self._sample & active).any() or self._sample[row])
        tokens, _, self._seen = self.programs.run(ProgramKey(b, c, window, sample, True), inp, self._sampling())
        rows = list(np.flatnonzero(active))
        self.slots[active] += 1
        if final:
            del self._pending[row]
            self.slots[row] = length
            self.active[row] = True
            rows.append(row)
        return tokens, rows

    def release(self, row: int) -> None:
        """The row's request ended (or was cancelled while its prompt waited); the row takes no more
        steps until it is admitted again."""
        self.active[row] = False
        self._pending.pop(row, None)
        self._sample[row] = False
        if self._suppress[row].any():
            self.suppress(row, None)
