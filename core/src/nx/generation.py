"""Host-side generation settings: HF's knob names, validated early with clear errors."""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from nx.errors import InputError


@dataclass(frozen=True)
class SamplingParams:
    """How the next token is chosen. Defaults follow Hugging Face's ``GenerationConfig``."""

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    def validated(self) -> SamplingParams:
        if self.do_sample and not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise InputError(
                f"temperature must be > 0 when sampling, got {self.temperature!r}; use do_sample=False for greedy"
            )
        if self.top_k is not None and (not isinstance(self.top_k, int) or self.top_k < 1):
            raise InputError(f"top_k must be an int >= 1 (or None to disable), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise InputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not self.repetition_penalty > 0:
            raise InputError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        return self

    def seed_or_random(self) -> int:
        return self.seed if self.seed is not None else secrets.randbits(31)


def normalize_stop(stop: Sequence[int] | Sequence[Sequence[int]] | None) -> list[tuple[int, ...]]:
    """``stop`` as a list of token-id sequences (a flat list of ints is one sequence)."""
    if not stop:
        return []
    if all(isinstance(t, (int, np.integer)) for t in stop):
        return [tuple(int(t) for t in stop)]
    seqs = [tuple(int(t) for t in s) for s in stop]
    if any(len(s) == 0 for s in seqs):
        raise InputError("stop sequences must not be empty")
    return seqs


def hits_stop(row: list[int], stops: list[tuple[int, ...]]) -> bool:
    """Whether generated tokens `row` end with any stop sequence."""
    return any(len(row) >= len(s) and tuple(row[-len(s) :]) == s for s in stops)
