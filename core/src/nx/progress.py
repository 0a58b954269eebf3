"""Progress bars for long work (weight loading, compiling buckets), shown on a terminal."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Iterator
from typing import TypeVar

T = TypeVar("T")


def should_show(flag: bool | None) -> bool:
    """`flag` if given, else whether stderr is a terminal."""
    return sys.stderr.isatty() if flag is None else flag


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool | None = None) -> Iterator[T]:
    """Iterate `items` with a rich progress bar on stderr (only when `enabled`, default: a tty)."""
    if not should_show(enabled):
        yield from items
        return
    from rich.console import Console
    from rich.progress import track as rich_track

    yield from rich_track(items, description=description, total=total, console=Console(stderr=True))
