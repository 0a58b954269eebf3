"""Tiny random Hugging Face checkpoints, one module per family, for the conformance suite.

Each module defines ``CASES``: a list of `Case`. A case builds a small HF model whose random weights
are scaled up (``initializer_range``) so that greedy output is not one repeated token.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Case:
    """One model variant of a family: `build()` returns an HF ``PreTrainedModel`` in eval mode."""

    family: str
    id: str
    build: Callable[[], object]
    vocab: int = 256

    def __str__(self) -> str:
        return self.id


def all_cases() -> list[Case]:
    cases: list[Case] = []
    for mod in pkgutil.iter_modules(__path__):
        cases += importlib.import_module(f"{__name__}.{mod.name}").CASES
    return cases


def seeded(build: Callable[[], object], seed: int = 0) -> Callable[[], object]:
    """Wrap a model constructor so its random weights are the same on every call."""

    def make():
        import torch

        torch.manual_seed(seed)
        return build().eval()

    return make


def randomize_norms_and_biases(model, std: float = 0.1):
    """HF initializes LayerNorms to (1, 0) and biases to 0, which would leave their mapping untested:
    give every bias N(0, std) and every LayerNorm gain N(1, 3*std)."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, std)
            elif p.ndim == 1:  # LayerNorm gains
                p.normal_(1.0, 3 * std)
    return model
