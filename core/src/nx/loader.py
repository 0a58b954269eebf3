"""`nx.load`: checkpoint -> family -> spec -> parameters -> compiled `NxModel`."""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from nx.checkpoint import Checkpoint, TensorSource, open_checkpoint
from nx.errors import CheckpointError
from nx.family import Family
from nx.model import NxModel, RuntimeConfig
from nx.params import build_params
from nx.registry import Registry, default_registry


def load(
    family_or_path: str | os.PathLike,
    path: str | os.PathLike | None = None,
    *,
    batch_size: int = 1,
    prompt_batch_size: int | None = None,
    n_positions: int | Sequence[int] = 1024,
    context_length_estimate: int | Sequence[int] | None = None,
    amp: str = "f32",
    backend: str = "cpu",
    compile: bool = True,
    progress: bool | None = None,
    registry: Registry | None = None,
) -> NxModel:
    """Load a checkpoint and compile it.

    ``nx.load("llama", path)`` uses the named family; ``nx.load(path)`` infers it from the
    checkpoint's ``model_type``. `path` is an HF model directory (safetensors, sharded safetensors
    or pytorch_model.bin) or a ``.gguf`` file. `n_positions` and `context_length_estimate` are the
    position and prompt buckets (an int means powers of two up to it); longer prompts are encoded
    in chunks of the largest prompt bucket. `prompt_batch_size` < `batch_size` encodes each prompt
    once and broadcasts it to ``batch_size // prompt_batch_size`` output rows. With ``compile=False``
    each program compiles on first use instead of now.
    """
    registry = registry or default_registry()
    config = RuntimeConfig.build(batch_size, n_positions, context_length_estimate, amp, backend, prompt_batch_size)
    if path is None:
        ckpt = open_checkpoint(family_or_path)
        family = registry.for_model_type(ckpt.model_type)
    else:
        family = registry.get(str(family_or_path))  # unknown family fails before touching the disk
        ckpt = open_checkpoint(path)
        if ckpt.model_type not in family.model_types:
            raise CheckpointError(
                f"{str(path)!r} is a {ckpt.model_type!r} checkpoint but family {family.name!r} accepts "
                f"{', '.join(family.model_types)}; use nx.load({str(path)!r}) to pick the family automatically"
            )
    spec = family.spec_from_config(ckpt.config)
    params = build_params(family, spec, hf_tensors(family, ckpt), progress=progress)
    model = NxModel(family, spec, params, config, ckpt.config, ckpt.load_tokenizer)
    return model.compile(progress) if compile else model


def hf_tensors(family: Family, ckpt: Checkpoint) -> TensorSource:
    """The checkpoint's tensors under HF names (GGUF files are renamed through the family)."""
    if ckpt.format != "gguf":
        return ckpt.tensors
    if family.from_gguf is None:
        raise CheckpointError(f"the {family.name} family cannot load GGUF files; use an HF checkpoint directory")
    renamed: dict[str, tuple[str, Any]] = {}
    for name in ckpt.tensors:
        mapped = family.from_gguf(name, ckpt.config)
        if mapped is not None:
            renamed[mapped[0]] = (name, mapped[1])
    shapes = {hf: ckpt.tensors.shapes[g] for hf, (g, _) in renamed.items()}
    return TensorSource(shapes, lambda hf: renamed[hf][1](ckpt.tensors[renamed[hf][0]]))
