"""``nx cache info`` / ``nx cache clear``: the on-disk compile cache."""

from __future__ import annotations

import click

from nx.cli import NxGroup, main, quiet_option


@main.group("cache", cls=NxGroup)
def cache_group() -> None:
    """The on-disk cache of compiled programs (NX_CACHE_DIR, default ~/.cache/nx; NX_CACHE_DIR=off disables it)."""


def _default_cache():
    """The compile cache `nx.load` uses by default, or None (said so) when NX_CACHE_DIR=off."""
    from nx.compile_cache import ENV, CompileCache

    cache = CompileCache.from_setting(True)
    if cache is None:
        click.echo(f"the compile cache is disabled ({ENV}=off)")
    return cache


@cache_group.command("info")
@quiet_option
def cache_info(quiet: bool) -> None:
    """Show where the compile cache is, how many programs it holds and its size."""
    cache = _default_cache()
    if cache is not None:
        click.echo(
            f"{cache.programs_dir}: {len(cache.entries())} programs, {cache.size_bytes() / 2**20:.1f} MiB (limit "
            f"{cache.max_bytes / 2**20:.0f} MiB); {len(cache.tokenizer_dirs())} tokenizers converted from GGUF files"
        )


@cache_group.command("clear")
@quiet_option
def cache_clear(quiet: bool) -> None:
    """Delete every cached program and tokenizer (they are rebuilt when next needed)."""
    cache = _default_cache()
    if cache is not None:
        click.echo(f"removed {cache.clear()} programs from {cache.programs_dir}")
