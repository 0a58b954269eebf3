"""`ContinuousBatch`: the rows of one model's batch, each at its own position, for requests that
join and leave at every step (continuous batching, as JetStream's insert/generate and vLLM do).

`insert` encodes one prompt into a free row with the insert programs (the other rows keep their
keys, values and sampling state); `step` feeds every active row its next token through the decode
program of the longest row's position bucket. Each row carries its own sampling settings, so
greedy and sampled requests share one step, and a row's tokens never depend on its neighbours.
"""

from __future__ import annotations

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
        self._knobs: tuple | None = None  # the rows' sampling knobs on the device, until a row's change
        self._zeros = (self._put(np.zeros(b, np.int32)), self._put(np.int32(0)))  # a step's pad; last and row

    def program_keys(self, sample: bool = False) -> list[ProgramKey]:
        """Every program `insert` and `step` can run: an insert per prompt bucket, a decode step per
        position bucket (compile them before serving, so no request waits for XLA)."""
        return buckets.serving_keys(self.config, sample)

    def _sampling(self) -> SamplingInputs:
        if self._knobs is None:  # sent once per change, not at every step
            put = self._put
            self._knobs = (put(np.where(self._sample, self._temperature, 0).astype(np.float32)), put(self._top_k),
                           put(self._top_p), put(self._penalty), put(self._keys))
        temperature, top_k, top_p, penalty, keys = self._knobs
        return SamplingInputs(temperature, top_k, top_p, penalty, self._seen, self._suppress_dev, keys)

    def suppress(self, row: int, tokens: np.ndarray | None) -> None:
        """Tokens row `row` may not choose from now on (EOS before min_new_tokens); None: none."""
        self._suppress[row] = False
        if tokens is not None and tokens.size:
            self._suppress[row, tokens] = True
        self._suppress_dev = self._put(self._suppress)

    def insert(self, row: int, prompt: list[int], sp: SamplingParams) -> jax.Array:
        """Encode `prompt` into batch row `row` (in chunks of the prompt buckets) and choose its first
        new token (``[1]`` on the device); the row becomes active."""
        self._sample[row] = sp.do_sample
        self._temperature[row] = sp.temperature
        self._top_k[row] = sp.top_k or 0
        self._top_p[row] = sp.top_p
        self._penalty[row] = sp.repetition_penalty
        self._keys[row] = row_keys(sp.seed_or_random(), 1)[0]
        self._knobs = None
        put, length = self._put, len(prompt)
        ids = np.asarray(prompt, np.int32)
        for start, c, window in buckets.prompt_chunks(self.config, length):
            chunk = np.zeros((1, c), np.int32)
            n = min(c, length - start)
            chunk[0, :n] = ids[start : start + n]
            last = (length - 1 - start) if start + c >= length else c - 1
            inp = decoder.StepInputs(put(chunk), put(np.array([start], np.int32)), put(np.zeros(1, np.int32)),
                                     put(np.int32(last)), put(np.int32(row)))
            key = ProgramKey(1, c, window, sp.do_sample, True)
            first, _, self._seen = self.programs.run(key, inp, self._sampling())
        self.slots[row] = length
        self.active[row] = True
        return first

    def step(self) -> jax.Array:
        """Feed every active row its next token (`tokens`); returns the next tokens ``[batch]`` on the
        device. Free rows compute along on placeholder input and are ignored."""
        active = self.active
        slots = np.where(active, self.slots, 0).astype(np.int32)
        window = buckets.decode_window(self.config, int(slots.max()))
        put, (pad, zero) = self._put, self._zeros
        inp = decoder.StepInputs(put(np.where(active, self.tokens, 0)[:, None].astype(np.int32)), put(slots), pad,
                                 zero, zero)
        key = ProgramKey(self.config.batch_size, 1, window, bool((self._sample & active).any()))
        tokens, _, self._seen = self.programs.run(key, inp, self._sampling())
        self.slots[active] += 1
        return tokens

    def release(self, row: int) -> None:
        """The row's request ended; the row takes no more steps until it is inserted into again."""
        self.active[row] = False
        self._sample[row] = False
        self._knobs = None
        if self._suppress[row].any():
            self.suppress(row, None)
