"""Row-independent products: a switch that makes every matmul of a traced program use one
formulation whatever its row count, so a token's products are the same bits beside any others.

XLA:CPU's matmul paths round differently by row count (`nx.ops.linear` picks a formulation by
it: one row, 2-16 rows, more), but within the ``x @ w.T`` formulation of two rows or more each row's
result does not depend on how many rows there are or where it sits (measured on f32 and bf16,
2-600 rows; int8 dots sum exactly). Continuous batching relies on it: a serving step computes
every active row's decode token and new prompts' tokens in one product, reading each weight once,
and a request's tokens must not depend on its company.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

_UNIFORM: contextvars.ContextVar[bool] = contextvars.ContextVar("nx_uniform_rows", default=False)


@contextlib.contextmanager
def uniform() -> Iterator[None]:
    """Trace the products inside this block with the row-count-independent formulation."""
    token = _UNIFORM.set(True)
    try:
        yield
    finally:
        _UNIFORM.reset(token)


def is_uniform() -> bool:
    """Whether products being traced now must not depend on their row count."""
    return _UNIFORM.get()
