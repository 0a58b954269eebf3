"""`save_pretrained_split`: write an in-memory Hugging Face model as a checkpoint nx loads.

The modern equivalent of ``transformers_neuronx.module.save_pretrained_split``: instead of one
file per tensor it writes (optionally sharded) safetensors plus ``config.json``, which nx reads
lazily, tensor by tensor, so a large checkpoint never has to fit in memory twice.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from nx.errors import CheckpointError


def save_pretrained_split(
    model: Any,
    directory: str | os.PathLike,
    *,
    max_shard_size: int | str = "2GB",
    tokenizer: Any = None,
) -> Path:
    """Save a ``transformers`` model (``PreTrainedModel``) to `directory` for ``nx.load``.

    Writes ``config.json`` and ``model.safetensors`` (or shards of at most `max_shard_size` with a
    ``model.safetensors.index.json``), and the `tokenizer` if given. Tied weights are stored once.
    Returns the directory.
    """
    if not hasattr(model, "save_pretrained") or not hasattr(model, "config"):
        raise CheckpointError(
            f"save_pretrained_split needs a transformers PreTrainedModel, got {type(model).__name__}"
        )
    if not getattr(model.config, "model_type", None):
        raise CheckpointError("the model's config has no model_type; nx could not pick a family when loading it")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True, max_shard_size=max_shard_size)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    return out
