"""``nx list-models``: the installed model families."""

from __future__ import annotations

from nx.cli import main, quiet_option


@main.command("list-models")
@quiet_option
def list_models(quiet: bool) -> None:
    """List installed model families and the plugins that provide them."""
    from rich.console import Console
    from rich.table import Table

    from nx.registry import default_registry

    reg = default_registry()
    table = Table(title="nx model families")
    for col in ("family", "plugin", "version", "HF model types", "description"):
        table.add_column(col)
    for fam in sorted(reg.families().values(), key=lambda f: f.name):
        table.add_row(fam.name, fam.distribution, fam.version, ", ".join(fam.model_types), fam.description)
    console = Console()
    console.print(table)
    for f in [] if quiet else reg.failures:
        console.print(f"[yellow]skipped plugin {f.name} ({f.distribution}): {f.error}[/yellow]")
    if not reg.families():
        console.print("no families installed: pip install nx-plugin-llama (or another nx-plugin-*)")
