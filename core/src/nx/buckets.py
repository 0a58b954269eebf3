"""Shape buckets: the sequence lengths programs are compiled for, and picking one per request."""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Sequence

from nx.errors import BucketError, ConfigError

MIN_POSITION_BUCKET = 128
MIN_CONTEXT_BUCKET = 16


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
    """Prefill lengths; by default powers of two from 16 up to the largest position bucket."""
    buckets = parse(positions[-1] if estimate is None else estimate, "context_length_estimate", MIN_CONTEXT_BUCKET)
    if buckets[-1] > positions[-1]:
        raise ConfigError(
            f"context_length_estimate {buckets[-1]} exceeds the largest n_positions bucket {positions[-1]}; "
            "raise n_positions or lower context_length_estimate"
        )
    return buckets


def pick(buckets: list[int], needed: int, what: str, hint: str) -> int:
    """Smallest bucket >= `needed`, else a `BucketError` naming the largest and how to raise it."""
    for b in buckets:
        if b >= needed:
            return b
    raise BucketError(f"{what} needs {needed} positions but the largest bucket is {buckets[-1]}; {hint}")
