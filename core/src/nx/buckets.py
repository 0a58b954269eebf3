"""Shape buckets: the sequence lengths programs are compiled for, and picking one per request."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, NamedTuple

from nx.errors import BucketError, ConfigError

MIN_POSITION_BUCKET = 128
MIN_CONTEXT_BUCKET = 16
#: The largest default prompt bucket: longer prompts run in chunks of it. Why: a prompt just over a
#: power of two no longer pads to the next one, chunks stay within the CPU kernels' row limits, and
#: a 3072-token prompt on SmolLM2 took half the time in chunks of 1024 as in one 4096-token call
#: (BENCHMARKS.md, "Long prompts in chunks of 1024").
MAX_DEFAULT_CONTEXT_BUCKET = 1024
#: How hints name the option, for Python and the command line alike.
N_POSITIONS = "n_positions (--n-positions on the command line)"


def _powers_of_two(lo: int, hi: int) -> list[int]:
    out, b = [], lo
    while b < hi:
        out.append(b)
        b *= 2
    return out + [hi]


def _is_int(v: object) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def parse(value: int | Sequence[int], name: str, minimum: int) -> list[int]:
    """An int becomes powers of two from `minimum` up to it; a list is used as given (sorted).

    Only ints are taken (a str, float or bool is a `ConfigError`, never coerced): ``"128"`` once
    became the buckets [1, 2, 8]."""
    if _is_int(value):
        if value < 1:
            raise ConfigError(f"{name} must be positive, got {value}")
        return _powers_of_two(min(minimum, int(value)), int(value))
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{name} must be a positive int or a list of positive ints, got {value!r}")
    items = list(value)
    if not items or not all(_is_int(v) and v >= 1 for v in items):
        raise ConfigError(f"{name} must be a positive int or a non-empty list of positive ints, got {value!r}")
    return sorted({int(v) for v in items})


def position_buckets(n_positions: int | Sequence[int]) -> list[int]:
    return parse(n_positions, "n_positions", MIN_POSITION_BUCKET)


def context_buckets(estimate: int | Sequence[int] | None, positions: list[int]) -> list[int]:
    """Prefill lengths; by default powers of two from 16 up to the largest position bucket or
    `MAX_DEFAULT_CONTEXT_BUCKET`, whichever is smaller."""
    default = min(positions[-1], MAX_DEFAULT_CONTEXT_BUCKET)
    buckets = parse(default if estimate is None else estimate, "context_length_estimate", MIN_CONTEXT_BUCKET)
    if buckets[-1] > positions[-1]:
        raise ConfigError(
            f"context_length_estimate {buckets[-1]} exceeds the largest n_positions bucket {positions[-1]}; "
            "raise n_positions or lower context_length_estimate"
        )
    return buckets


#: Prompt buckets `nx serve` adds by default: every multiple of this many tokens up to `SERVING_FINE_UP_TO`.
SERVING_STEP = 16
SERVING_FINE_UP_TO = 128


def serving_context_buckets(positions: list[int]) -> list[int]:
    """The prompt buckets `nx serve` uses unless told otherwise: every multiple of 16 tokens up to
    128, then powers of two up to the largest position bucket or `MAX_DEFAULT_CONTEXT_BUCKET`.

    Why: every insert pads its prompt to a bucket while the running rows wait, so a server pays
    for padding on every request; fine steps where chat prompts are (BENCHMARKS.md, "Serving")."""
    top = min(positions[-1], MAX_DEFAULT_CONTEXT_BUCKET)
    fine = list(range(SERVING_STEP, min(SERVING_FINE_UP_TO, top) + 1, SERVING_STEP))
    return sorted(set(fine) | {b for b in _powers_of_two(MIN_CONTEXT_BUCKET, top) if b > SERVING_FINE_UP_TO} | {top})


def pick(buckets: list[int], needed: int, what: str, hint: str) -> int:
    """Smallest bucket >= `needed`, else a `BucketError` naming the largest and how to raise it."""
    for b in buckets:
        if b >= needed:
            return b
    raise BucketError(f"{what} needs {needed} positions but the largest bucket is {buckets[-1]}; {hint}")


# ---- which program serves what: pure functions of a RuntimeConfig (see nx.config) -------------
class ProgramKey(NamedTuple):
    """Which program: `rows` x `tokens` fed at once, attending over `window` positions, greedy or
    sampling; an `insert` program encodes one prompt into a chosen batch row (continuous batching);
    a decode program with `steps` > 1 runs up to that many decode steps in one call (`decode_block`)."""

    rows: int
    tokens: int
    window: int
    sample: bool = False
    insert: bool = False
    steps: int = 1

    @property
    def name(self) -> str:
        """File-name form: ``prefill_b1_t64_w128``, ``decode_b4_w256``, ``decode_b4_w256_k4``,
        ``insert_t64_w128`` (+ ``_sample``)."""
        if self.insert:
            base = f"insert_t{self.tokens}_w{self.window}"
        elif self.tokens == 1:
            base = f"decode_b{self.rows}_w{self.window}" + (f"_k{self.steps}" if self.steps > 1 else "")
        else:
            base = f"prefill_b{self.rows}_t{self.tokens}_w{self.window}"
        return base + ("_sample" if self.sample else "")


def decode_key(config: Any, window: int, sample: bool = False) -> ProgramKey:
    """The decode program `generate` / `stream` run over `window`: ``config.decode_steps`` steps a call."""
    return ProgramKey(config.batch_size, 1, window, sample, steps=getattr(config, "decode_steps", 1))


def default_keys(config: Any, sample: bool = False) -> list[ProgramKey]:
    """The programs a model builds up front: a prefill per prompt bucket (over the smallest
    position bucket holding it, as `prompt_chunks` picks) and a decode program per position bucket
    (`decode_key`). Prompts longer than the largest prompt bucket need more prefill programs (`all_keys`)."""
    pos = list(config.n_positions)
    return [ProgramKey(config.prompt_batch_size, c, pick(pos, c, "", ""), sample) for c in config.context_buckets] + [
        decode_key(config, p, sample) for p in pos
    ]


def all_keys(config: Any, sample: bool = False) -> list[ProgramKey]:
    """Every program `generate` can run for any prompt length: `default_keys` plus the prefill
    programs over larger position buckets that chunks of long prompts need (`prefill_shapes`)."""
    prefill = [ProgramKey(config.prompt_batch_size, c, w, sample) for c, w in prefill_shapes(config)]
    return list(dict.fromkeys(default_keys(config, sample) + prefill))


def serving_keys(config: Any, sample: bool = False) -> list[ProgramKey]:
    """Every program continuous batching (`nx.batch`) can run: an insert per prefill shape any
    prompt length needs (`prefill_shapes`) and a decode step per position bucket."""
    inserts = [ProgramKey(1, c, w, sample, True) for c, w in prefill_shapes(config)]
    return inserts + [ProgramKey(config.batch_size, 1, p, sample) for p in config.n_positions]


def _chunk(config: Any, start: int, length: int) -> tuple[int, int, int]:
    """(start, tokens, window) of the prefill call encoding a `length`-token prompt from `start`:
    the smallest prompt bucket holding the rest (at most the largest), moved back to fit the cache."""
    ctx = list(config.context_buckets)
    c = min(pick(ctx, min(length - start, ctx[-1]), "", ""), config.max_positions)
    start = min(start, config.max_positions - c)
    return start, c, pick(list(config.n_positions), start + c, "", "")


def prompt_chunks(config: Any, length: int) -> Iterator[tuple[int, int, int]]:
    """(start, tokens, window) of each prefill call encoding a `length`-token prompt: one prompt
    bucket, or chunks of the largest one; the last chunk starts early enough to fit the cache,
    re-encoding a few tokens rather than overflowing it."""
    start = 0
    while True:
        start, c, window = _chunk(config, start, length)
        yield start, c, window
        if start + c >= length:
            return
        start += c


def prefill_shapes(config: Any) -> list[tuple[int, int]]:
    """Every (tokens, window) a prefill call can have for any prompt of 1..max_positions tokens,
    smallest first: what an artifact must hold to serve every prompt length without compiling.

    Every chunk but the last is a full largest bucket, so each chunk of a prompt is the last
    chunk of some prompt length; that one starts at the multiple of the largest bucket below it."""
    top = config.context_buckets[-1]
    return sorted({_chunk(config, (n - 1) // top * top, n)[1:] for n in range(1, config.max_positions + 1)})


def decode_window(config: Any, slot: int) -> int:
    """The position bucket of the decode step writing cache slot `slot`."""
    return pick(list(config.n_positions), slot + 1, "generation", f"load the model with a larger {N_POSITIONS}")


def decode_block(config: Any, slot: int, steps: int, left: int) -> tuple[int, int]:
    """(steps, window) of the multi-step decode call writing cache slots from `slot`: at most
    `steps`, at most the `left` steps still wanted, and never past the end of `slot`'s position
    bucket, so every step attends over the window a one-step call would (same numbers, same
    tokens) and no call writes beyond the cache."""
    window = decode_window(config, slot)
    return max(1, min(steps, left, window - slot)), window


def decode_windows(config: Any, length: int, max_new_tokens: int) -> list[int]:
    """The position buckets the decode steps after a `length`-token prompt use (the last new
    token is never fed back)."""
    return sorted({decode_window(config, s) for s in range(length, length + max_new_tokens - 1)})


def request_keys(config: Any, length: int, max_new_tokens: int, sample: bool = False) -> list[ProgramKey]:
    """The programs generating `max_new_tokens` after a `length`-token prompt runs."""
    check_fits(config, length, max_new_tokens, f"max_new_tokens={max_new_tokens}",
               "lower max_new_tokens (--max-new-tokens)")
    prefill = [ProgramKey(config.prompt_batch_size, c, w, sample) for _, c, w in prompt_chunks(config, length)]
    decode = [decode_key(config, w, sample) for w in decode_windows(config, length, max_new_tokens)]
    return list(dict.fromkeys(prefill + decode))


def check_fits(config: Any, length: int, extra: int = 0, what: str = "", hint: str = "") -> None:
    """A `length`-token prompt plus `extra` more positions must fit the largest position bucket."""
    top = config.max_positions
    if length > top:
        raise BucketError(
            f"a prompt of {length} tokens is longer than the largest n_positions bucket {top}; "
            f"load the model with a larger {N_POSITIONS}"
        )
    if length + extra > top:
        raise BucketError(
            f"a prompt of {length} tokens plus {what} needs {length + extra} positions but the largest "
            f"n_positions bucket is {top}; load the model with a larger {N_POSITIONS} or {hint}"
        )
