"""nx: run LLM inference from Hugging Face checkpoints as compiled XLA programs.

``import nx`` is cheap: jax, torch and transformers load only when a model is loaded.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from nx.errors import (
    ArtifactError,
    BucketError,
    CheckpointError,
    ConfigError,
    InputError,
    NxError,
    PluginError,
    ResourceError,
    ShapeMismatchError,
    UnknownFamilyError,
    WeightKeyError,
)
from nx.hookspecs import hookimpl
from nx.version import __version__

if TYPE_CHECKING:
    from nx.convert import save_pretrained_split
    from nx.engine import Engine, EngineClosedError, QueueFullError
    from nx.loader import load
    from nx.model import NxModel
    from nx.quant import QuantizationConfig

__all__ = [
    "ArtifactError",
    "BucketError",
    "CheckpointError",
    "ConfigError",
    "Engine",
    "EngineClosedError",
    "InputError",
    "NxError",
    "NxModel",
    "PluginError",
    "QuantizationConfig",
    "QueueFullError",
    "ResourceError",
    "ShapeMismatchError",
    "UnknownFamilyError",
    "WeightKeyError",
    "__version__",
    "hookimpl",
    "load",
    "save_pretrained_split",
]


def __getattr__(name: str) -> Any:
    if name == "load":
        from nx.loader import load

        return load
    if name == "NxModel":
        from nx.model import NxModel

        return NxModel
    if name in ("Engine", "EngineClosedError", "QueueFullError"):
        from nx import engine

        return getattr(engine, name)
    if name == "QuantizationConfig":
        from nx.quant import QuantizationConfig

        return QuantizationConfig
    if name == "save_pretrained_split":
        from nx.convert import save_pretrained_split

        return save_pretrained_split
    raise AttributeError(f"module 'nx' has no attribute {name!r}")
