"""Progress of long work (reading weights, compiling programs) on stderr.

`progress` settings, as the `progress` load option takes them:

- None (the library default): a bar on a terminal, nothing otherwise, so scripts and servers
  that embed nx stay silent;
- True (what the CLI passes unless ``--quiet``): a bar on a terminal, otherwise plain lines
  (``compiling 2 programs ...`` then ``compiling 2 programs: done in 1.3s``), so logs of runs
  under pipes, CI or a container show what is happening too;
- False: nothing.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")


def mode(flag: bool | None) -> str:
    """"bar", "lines" or "off" for a `progress` setting (see the module docstring)."""
    if flag is False:
        return "off"
    if sys.stderr.isatty():
        return "bar"
    return "lines" if flag else "off"


def should_show(flag: bool | None) -> bool:
    """Whether a `progress` setting shows anything here."""
    return mode(flag) != "off"


def plural(n: int, noun: str) -> str:
    """``1 program``, ``2 programs``."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def line(text: str) -> None:
    """One progress line on stderr, flushed (so it shows before the work it announces)."""
    print(text, file=sys.stderr, flush=True)


@contextmanager
def step(description: str, enabled: bool | None = None) -> Iterator[None]:
    """Announce a step with no count of its own (``loading model ...``) and say when it is done,
    with its duration; on a terminal too, as a bar would have nothing to count."""
    if not should_show(enabled):
        yield
        return
    line(f"{description} ...")
    t0 = time.perf_counter()
    yield
    line(f"{description}: done in {time.perf_counter() - t0:.1f}s")


def track(items: Iterable[T], description: str, total: int | None = None, enabled: bool | None = None) -> Iterator[T]:
    """Iterate `items`, showing progress: a rich bar on a terminal, a start and a done line otherwise."""
    shown = mode(enabled)
    if shown == "off":
        yield from items
    elif shown == "lines":
        with step(description, True):
            yield from items
    else:
        from rich.console import Console
        from rich.progress import track as rich_track

        yield from rich_track(items, description=description, total=total, console=Console(stderr=True))
