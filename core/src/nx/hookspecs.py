"""The contract between nx and its plugins (pluggy project "nx").

A plugin is a module exposing functions decorated with `nx.hookimpl` whose names match the
hookspecs below, advertised through the entry-point group ``nx.plugins``::

    [project.entry-points."nx.plugins"]
    llama = "nx_llama"

Hooks receive a ``register`` callback rather than returning values so one plugin can register
several things and the registry can tell exactly which plugin registered what.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

if TYPE_CHECKING:
    from nx.family import Family

PROJECT_NAME = "nx"

hookspec = pluggy.HookspecMarker(PROJECT_NAME)
hookimpl = pluggy.HookimplMarker(PROJECT_NAME)


@hookspec
def nx_register_families(register: Callable[[Family], None]) -> None:
    """Register model families: call ``register(Family(...))`` once per family.

    A `nx.family.Family` names the family, the Hugging Face ``model_type`` values and
    architectures it accepts, and how to translate a config and a checkpoint into nx's model
    description (`nx.spec.ModelSpec`) and parameter tree. Keep this cheap: importing jax or torch
    here slows down ``nx list-models``.
    """
