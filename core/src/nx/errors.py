"""The nx error hierarchy: every problem a user can cause is an `NxError` that says what to do."""

from __future__ import annotations


class NxError(Exception):
    """Base of every error nx raises on purpose."""


class UnknownFamilyError(NxError, LookupError):
    """No installed plugin provides the requested model family."""


class PluginError(NxError):
    """A plugin is broken or two plugins claim the same family."""


class CheckpointError(NxError):
    """A checkpoint is missing, unreadable, corrupt, or does not fit the family."""


class WeightKeyError(CheckpointError, KeyError):
    """Weights are missing from, or unexpected in, a checkpoint."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0]) if self.args else ""


class ShapeMismatchError(CheckpointError):
    """A weight's shape disagrees with the model config."""


class ArtifactError(CheckpointError):
    """A saved compiled artifact (``model.save`` / ``nx compile``) is corrupt, truncated, or was
    built by another nx / jax version, platform or device setup: recompile it."""


class ConfigError(NxError, ValueError):
    """An invalid option passed to `nx.load` or found in a model config."""


class InputError(NxError, ValueError):
    """Bad input to `generate`: shapes, lengths, batch size or ids."""


class BucketError(InputError):
    """A request does not fit any compiled shape bucket."""


class ResourceError(NxError):
    """The model does not fit the memory of the devices it was asked to run on."""
