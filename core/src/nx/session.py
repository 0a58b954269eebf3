"""`Session`: one batch of sequences advancing through the model, step by step.

A session holds every row of the KV cache while it is open (`start` .. `close`), so no other
generation can overwrite its keys and values: another thread's session waits for the rows, and a
second session opened by the same thread is an `InputError` (it could only deadlock or corrupt).
`generate`, `stream`, the Hugging Face adapter, `nx bench` and warm-up runs all go through it.
"""

from __future__ import annotations

from dataclasses import dataclass

import jax
import numpy as np

from nx import buckets, decoder
from nx.config import RuntimeConfig
from nx.errors import InputError
from nx.generation import SamplingParams
from nx.programs import BlockInputs, ProgramKey, ProgramSet
from nx.sampling import SamplingInputs


@dataclass(frozen=True)
class Prompt:
    """Checked prompt rows: token ids ``[rows, length]`` (0 on padding) and each row's left padding."""

    ids: np.ndarray
    pad: np.ndarray

    @property
    def length(self) -> int:
        return int(self.ids.shape[1])


def row_keys(seed: int, rows: int) -> np.ndarray:
    """PRNG key data ``[rows, 2]`` (uint32) from one seed: row b's key is the seed's folded with b
    (``jax.random.fold_in(jax.random.key(seed), b)``), so the rows of one batch draw differently
    and the same seed repeats them. Computed on the host for seeds in [0, 2**31) (jax would compile
    a program for it, a tenth of a second at start-up); by jax for the others."""
    if not 0 <= seed < 2**31 or jax.config.jax_default_prng_impl != "threefry2x32":
        key = jax.random.key(seed)
        return np.stack([np.asarray(jax.random.key_data(jax.random.fold_in(key, b))) for b in range(rows)])
    hi, lo = _threefry2x32(np.uint32(0), np.uint32(seed), np.zeros(rows, np.uint32), np.arange(rows, dtype=np.uint32))
    return np.stack([hi, lo], axis=1)


def _threefry2x32(k0: np.uint32, k1: np.uint32, x0: np.ndarray, x1: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The Threefry-2x32 block cipher (20 rounds) of counters (x0, x1) under key (k0, k1), as jax's
    ``threefry2x32`` PRNG computes it (``fold_in(key, b)`` encrypts the counter (0, b))."""
    ks = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    rotations = ((13, 15, 26, 6), (17, 29, 16, 24))
    with np.errstate(over="ignore"):  # arithmetic mod 2**32
        x0, x1 = x0 + ks[0], x1 + ks[1]
        for i in range(5):
            for r in rotations[i % 2]:
                x0 = x0 + x1
                x1 = ((x1 << np.uint32(r)) | (x1 >> np.uint32(32 - r))) ^ x0
            x0, x1 = x0 + ks[(i + 1) % 3], x1 + ks[(i + 2) % 3] + np.uint32(i + 1)
    return x0, x1


class Session:
    """The state of one batch between program calls: the next cache slot, padding, sampling."""

    def __init__(self, programs: ProgramSet, config: RuntimeConfig, prompt: Prompt, sampling: SamplingParams) -> None:
        self.programs, self.config, self.prompt = programs, config, prompt
        self.sample = sampling.do_sample
        self._put = programs.placement.put
        self._rows = programs.kv.acquire(config.batch_size, wait=True)  # every row, for this session only
        self.slot = 0  # cache position the next fed token is written to
        self.pad = self._put(np.repeat(prompt.pad, config.broadcast).astype(np.int32))
        self._zero = self._put(np.int32(0))  # a decode step's `last` and `row`: one transfer, not two a step
        self.sampling = self._sampling_inputs(sampling)
        self.closed = False

    def _sampling_inputs(self, sp: SamplingParams) -> SamplingInputs:
        b, v, rep = self.config.batch_size, self.programs.spec.vocab_size, self.config.broadcast
        ids, pad = self.prompt.ids, self.prompt.pad
        seen = np.zeros((b, v), bool)
        rows = np.repeat(np.arange(ids.shape[0]), rep)
        real = np.arange(ids.shape[1])[None, :] >= np.repeat(pad, rep)[:, None]
        r, c = np.nonzero(real)
        seen[r, ids[rows[r], c]] = True
        put = self._put
        return SamplingInputs(
            put(np.full((b,), sp.temperature, np.float32)), put(np.full((b,), sp.top_k or 0, np.int32)),
            put(np.full((b,), sp.top_p, np.float32)), put(np.full((b,), sp.repetition_penalty, np.float32)),
            put(seen), put(np.zeros((b, v), bool)), put(row_keys(sp.seed_or_random(), b)),
        )

    def _call(self, tokens, window: int, slot: int, pad, last: int, suppress=None):
        if self.closed:
            raise InputError("this generation session is closed; start a new one")
        rows, n = tokens.shape
        if isinstance(tokens, np.ndarray):
            tokens = self._put(tokens.astype(np.int32))
        inp = decoder.StepInputs(tokens, self._put(np.full(rows, slot, np.int32)), pad,
                                 self._zero if last == 0 else self._put(np.int32(last)), self._zero)
        smp = self.sampling if suppress is None else self.sampling._replace(suppress=suppress)
        tokens, logits, seen = self.programs.run(ProgramKey(rows, n, window, self.sample), inp, smp)
        self.sampling = self.sampling._replace(seen=seen)
        return tokens, logits

    def start(self, suppress=None) -> tuple[jax.Array, jax.Array]:
        """Encode the prompt (in chunks when longer than the largest prompt bucket) and choose the
        first new token of every row; returns (tokens ``[batch]``, logits ``[batch, vocab]``)."""
        ids, length = self.prompt.ids, self.prompt.length
        pad = self._put(self.prompt.pad.astype(np.int32))
        for start, c, window in buckets.prompt_chunks(self.config, length):
            chunk = np.zeros((ids.shape[0], c), np.int32)
            n = min(c, length - start)
            chunk[:, :n] = ids[:, start : start + n]
            last = (length - 1 - start) if start + c >= length else c - 1
            tokens, logits = self._call(chunk, window, start, pad, last, suppress)
        self.slot = length
        return tokens, logits

    def step(self, tokens: jax.Array, suppress=None) -> tuple[jax.Array, jax.Array]:
        """Feed one token per row (``[batch]``, on the device or host); returns the next (tokens, logits)."""
        window = buckets.decode_window(self.config, self.slot)
        tokens, logits = self._call(tokens[:, None], window, self.slot, self.pad, 0, suppress)
        self.slot += 1
        return tokens, logits

    def steps(self, tokens: jax.Array, steps: int, left: int, eos: jax.Array, ban: int, done: jax.Array
              ) -> tuple[jax.Array, jax.Array, jax.Array, int]:
        """Feed one token per row (``[batch]``) and run up to `steps` decode steps in one program
        call (at most `left`, never across a window: `buckets.decode_block`), each row's chosen
        token fed back on the device. `eos` ``[batch, vocab]`` marks each row's EOS ids: the first
        `ban` steps may not choose one (min_new_tokens), and the loop ends early once every row
        has chosen one (`done` ``[batch]`` bool: rows done before). Returns (tokens ``[batch,
        steps]``, the last token of every row ``[batch]``, done, steps asked for); after an early end
        the rest of `tokens` is meaningless, as every row is done. Each step is the one `step`
        would run (same window, slot and PRNG position), so the tokens are those of `step`."""
        if self.closed:
            raise InputError("this generation session is closed; start a new one")
        n, window = buckets.decode_block(self.config, self.slot, steps, left)
        rows = self.config.batch_size
        put = self._put
        inp = decoder.StepInputs(tokens[:, None], put(np.full(rows, self.slot, np.int32)), self.pad, self._zero,
                                 self._zero)
        blk = BlockInputs(put(np.int32(n)), put(np.int32(min(max(ban, 0), n))), done)
        key = ProgramKey(rows, 1, window, self.sample, steps=steps)
        out, _, seen, last, done = self.programs.run(key, inp, self.sampling._replace(suppress=eos), blk)
        self.sampling = self.sampling._replace(seen=seen)
        self.slot += n
        return out, last, done, n

    def reorder(self, rows: np.ndarray) -> None:
        """Make row i continue what row ``rows[i]`` held so far (beam search): gathers the KV cache,
        padding and seen-token masks on the devices instead of encoding the sequences again."""
        rows = np.asarray(rows, np.int32)
        host = self.programs.placement.host
        self.programs.kv.reorder(rows)
        self.pad = self._put(host(self.pad)[rows])
        self.sampling = self.sampling._replace(seen=self._put(host(self.sampling.seen)[rows]))

    def close(self) -> None:
        """Give the cache rows back (idempotent)."""
        if not self.closed:
            self.closed = True
            self.programs.kv.release(self._rows)

    def __enter__(self) -> Session:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:  # an abandoned stream must not hold the rows forever
        if not getattr(self, "closed", True):
            self.close()

