"""Prompt arrays checked before they reach a compiled program: `input_ids` and `attention_mask`.

The programs trust their inputs (a gather clamps an out-of-range id, a mask value of 2 would
shift the padding count), so everything a caller can get wrong is caught here, on the host, as
an `nx.InputError` saying what to fix.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from nx.errors import InputError


def token_array(x: Any, name: str) -> np.ndarray:
    """`x` (a torch tensor, numpy array or nested list; one row may be 1-D) as a 2-D int64 array."""
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except (ValueError, TypeError, OverflowError) as exc:
        raise InputError(f"{name} must be a 2-D array of token ids (rows of equal length): {exc}") from exc
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_) or a.size == 0):
        raise InputError(f"{name} must be a 2-D array of integer token ids, got shape {a.shape} dtype {a.dtype}")
    if a.dtype == np.uint64 and a.size and a.max() > np.iinfo(np.int64).max:
        raise InputError(f"{name} holds id {int(a.max())}, beyond any vocabulary; was it encoded with this model's tokenizer?")
    return a.astype(np.int64)


def check_vocabulary(ids: np.ndarray, vocab_size: int, name: str, where: np.ndarray | None = None) -> None:
    """Every id of `ids` (those where `where` is True, if given) lies in ``[0, vocab_size)``."""
    bad = (ids < 0) | (ids >= vocab_size)
    if where is not None:
        bad &= where
    if bad.any():
        raise InputError(
            f"{name}: token id {int(ids[bad][0])} is outside the vocabulary [0, {vocab_size}); "
            "was the prompt encoded with this model's tokenizer?"
        )


def attention_mask(mask: Any, ids: np.ndarray) -> np.ndarray:
    """The 0/1 mask of left-padded prompts `ids` (all ones if `mask` is None), as int64.

    Only 0 (padding) and 1 (token) are accepted and every 0 must precede the row's first 1:
    the programs count a row's padding as its number of zeros."""
    if mask is None:
        return np.ones_like(ids)
    m = token_array(mask, "attention_mask")
    if m.shape != ids.shape:
        raise InputError(f"attention_mask shape {m.shape} differs from input_ids shape {ids.shape}")
    odd = (m != 0) & (m != 1)
    if odd.any():
        raise InputError(
            f"attention_mask holds {int(m[odd][0])}; it must hold only 0 (padding) and 1 (prompt token), "
            "as a tokenizer's attention_mask does"
        )
    if (np.diff(m, axis=1) < 0).any():
        raise InputError(
            "attention_mask is not left-padded (a 1 is followed by a 0); pad prompts on the left, "
            "e.g. tokenizer.padding_side = 'left'"
        )
    if (m.sum(1) == 0).any():
        raise InputError("a row of attention_mask is all zeros; every prompt needs at least one token")
    return m


def prompts(input_ids: Any, mask: Any, vocab_size: int, rows: int, rows_option: str) -> tuple[np.ndarray, np.ndarray]:
    """Checked prompts: (ids int32 ``[rows, length]`` with padding set to id 0, leading padding per
    row int32 ``[rows]``). `rows` is the batch the model was compiled for, `rows_option` the
    `nx.load` option that sets it (named in the error)."""
    ids = token_array(input_ids, "input_ids")
    if ids.shape[1] == 0:
        raise InputError("input_ids is empty; give at least one prompt token")
    if ids.shape[0] != rows:
        raise InputError(
            f"got a batch of {ids.shape[0]} prompt(s) but the model was compiled for {rows_option}={rows}; "
            f"pass exactly that many rows or reload with batch_size={ids.shape[0]}"
        )
    m = attention_mask(mask, ids)
    real = m.astype(bool)
    check_vocabulary(ids, vocab_size, "input_ids", real)
    pad = ids.shape[1] - m.sum(1)
    return np.where(real, ids, 0).astype(np.int32), pad.astype(np.int32)
