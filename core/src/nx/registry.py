"""Plugin discovery (entry-point group ``nx.plugins``) and family lookup.

Plugins load once, lazily, on first use. ``NX_PLUGINS`` restricts which load: unset loads all,
a comma-separated list loads only those entry points (or distributions), empty loads none.
A plugin that fails to import is reported with a warning and skipped.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from functools import lru_cache
from importlib.metadata import entry_points
from types import ModuleType

import pluggy

from nx import hookspecs
from nx.errors import PluginError, UnknownFamilyError
from nx.family import Family

ENTRY_POINT_GROUP = "nx.plugins"
PLUGINS_ENV = "NX_PLUGINS"


@dataclass(frozen=True)
class PluginFailure:
    """A plugin that could not be used, and why."""

    name: str
    distribution: str
    error: str


class Registry:
    """The plugin manager plus the families its plugins registered."""

    def __init__(self, load_entry_points: bool = True) -> None:
        self.pm = pluggy.PluginManager(hookspecs.PROJECT_NAME)
        self.pm.add_hookspecs(hookspecs)
        self.failures: list[PluginFailure] = []
        self._origins: dict[str, tuple[str, str]] = {}  # plugin name -> (distribution, version)
        self._families: dict[str, Family] | None = None
        if load_entry_points:
            self._load_entry_points()

    def _load_entry_points(self) -> None:
        wanted = _wanted_plugins()
        for ep in entry_points(group=ENTRY_POINT_GROUP):
            dist = ep.dist.name if ep.dist else "?"
            version = ep.dist.version if ep.dist else "?"
            if wanted is not None and ep.name not in wanted and dist not in wanted:
                continue
            if self.pm.has_plugin(ep.name):
                continue
            try:
                module = ep.load()
            except Exception as exc:  # a broken plugin must never take the CLI down
                self._fail(ep.name, dist, f"failed to import: {exc!r}")
                continue
            self.register(module, name=ep.name, distribution=dist, version=version)

    def _fail(self, name: str, dist: str, why: str) -> None:
        self.failures.append(PluginFailure(name, dist, why))
        warnings.warn(f"nx: plugin {name!r} ({dist}) {why}; skipping it", RuntimeWarning, stacklevel=3)

    def register(
        self,
        plugin: object | ModuleType,
        name: str | None = None,
        distribution: str = "<in-process>",
        version: str = "",
    ) -> None:
        """Register a plugin object or module in-process (tests, notebooks, embedding apps)."""
        name = self.pm.register(plugin, name=name)
        self._origins[name] = (distribution, version)
        self._families = None

    def families(self) -> dict[str, Family]:
        """All registered families by name (duplicates are a `PluginError` naming both plugins)."""
        if self._families is None:
            found: dict[str, Family] = {}
            for impl in self.pm.hook.nx_register_families.get_hookimpls():
                plugin = impl.plugin_name
                dist, version = self._origins.get(plugin, ("<in-process>", ""))
                batch: list[Family] = []
                try:
                    impl.function(register=batch.append)
                except Exception as exc:
                    self._fail(plugin, dist, f"raised while registering families: {exc!r}")
                    continue
                for fam in batch:
                    if fam.name in found:
                        other = found[fam.name]
                        raise PluginError(
                            f"model family {fam.name!r} is registered by two plugins: "
                            f"{other.plugin!r} ({other.distribution}) and {plugin!r} ({dist}). "
                            f"Uninstall one of them, or pick one with {PLUGINS_ENV}=<plugin>."
                        )
                    found[fam.name] = fam.with_origin(plugin, dist, version)
            self._families = found
        return self._families

    def get(self, name: str) -> Family:
        """The family called `name`; unknown names list what is installed and what to install."""
        fams = self.families()
        if name in fams:
            return fams[name]
        by_type = self.for_model_type(name, required=False)
        if by_type is not None:
            return by_type
        installed = ", ".join(sorted(fams)) or "none"
        raise UnknownFamilyError(
            f"unknown model family {name!r}; installed families: {installed}. "
            f"To add it: pip install nx-plugin-{name.replace('_', '').lower()}"
        )

    def for_model_type(self, model_type: str, required: bool = True) -> Family | None:
        """The family accepting an HF ``model_type`` (as in config.json)."""
        for fam in self.families().values():
            if model_type in fam.model_types:
                return fam
        if not required:
            return None
        installed = ", ".join(f"{f.name} ({'/'.join(f.model_types)})" for f in self.families().values())
        raise UnknownFamilyError(
            f"no installed plugin handles model_type {model_type!r}; installed: {installed or 'none'}. "
            f"Install the matching plugin, e.g. pip install nx-plugin-{model_type.replace('_', '')}"
        )


def _wanted_plugins() -> set[str] | None:
    raw = os.environ.get(PLUGINS_ENV)
    if raw is None:
        return None
    return {p.strip() for p in raw.split(",") if p.strip()}


@lru_cache(maxsize=1)
def default_registry() -> Registry:
    """The process-wide registry built from installed entry points (loaded once)."""
    return Registry()


def families() -> dict[str, Family]:
    return default_registry().families()


def get_family(name: str) -> Family:
    return default_registry().get(name)


def iter_families(registry: Registry | None = None) -> Iterable[Family]:
    return (registry or default_registry()).families().values()
