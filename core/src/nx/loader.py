"""`nx.load`: checkpoint -> family -> spec -> parameters -> compiled `NxModel`."""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from typing import Any

from nx import artifacts, distributed, memory, scan, sharding
from nx.checkpoint import Checkpoint, TensorSource, open_checkpoint
from nx.compile_cache import CompileCache
from nx.errors import CheckpointError
from nx.family import Family
from nx.gguf_quant import keep_quantized
from nx.model import AMP_DTYPES, NxModel, RuntimeConfig, select_devices
from nx.params import build_params
from nx.quant import as_config as as_quant_config
from nx.quant import check_groups, map_rows
from nx.quant import weight_bytes as quant_weight_bytes
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
    tp_degree: int = 1,
    devices: Sequence[int] | None = None,
    unroll: int | None = None,
    device_memory: int | None = None,
    quant: Any = None,
    compile: bool = True,
    compile_cache: bool | str | os.PathLike = True,
    warmup: bool = False,
    progress: bool | None = None,
    registry: Registry | None = None,
) -> NxModel:
    """Load a checkpoint and compile it.

    ``nx.load("llama", path)`` uses the named family; ``nx.load(path)`` infers it from the
    checkpoint's ``model_type``. `path` is an HF model directory (safetensors, sharded safetensors
    or pytorch_model.bin) or a ``.gguf`` file. `n_positions` and `context_length_estimate` are the
    position and prompt buckets (an int means powers of two up to it); longer prompts are encoded
    in chunks of the largest prompt bucket. `prompt_batch_size` < `batch_size` encodes each prompt
    once and broadcasts it to ``batch_size // prompt_batch_size`` output rows. Every bucket's program
    compiles now, in parallel threads (`NxModel.compile`); with ``compile=False`` each compiles on
    first use instead. Compiled programs are kept in an on-disk cache and loaded from it when the
    same program is needed again (`nx.compile_cache`: ``$NX_CACHE_DIR`` or ``~/.cache/nx``;
    ``compile_cache`` False disables it, a path picks the directory). ``warmup=True`` also runs
    each program once as soon as it is built (`NxModel.warmup`), so the first requests do not pay
    XLA's first-call setup (~0.5 s per prompt bucket on CPU).

    `tp_degree` shards weights and KV cache over that many devices (on CPU nx creates the host
    devices itself if jax has not started yet); `devices` picks device ids (e.g. to run several
    models side by side on disjoint devices); `device_memory` overrides the bytes per device used
    by the fit check (weights + KV cache must fit in ``device_memory * tp_degree``).

    `unroll` (a divisor of the layer count) compiles a block of that many layers once and scans it
    over the stack: faster compiles of deep models, slower decode on CPU (see `nx.scan`); the
    default None unrolls every layer.

    `quant` (``nx.QuantizationConfig(...)``, ``"s8"`` or ``"s4"``) stores 2-D weights as int8 with
    per-output-channel scales (or per-group ones) or as 4-bit with per-group scales, multiplied
    inside the compiled programs. A GGUF file's Q8_0 / Q4_0 / Q4_1 / Q4_K / Q6_K blocks load
    quantized by default (`nx.gguf_quant`, logged); ``quant="f32"`` dequantizes them instead.

    A directory written by ``model.save`` / ``nx compile`` (it holds ``nx-artifact.json``) is
    restored with its compiled programs and no XLA compile; its buckets, amp, tp and quantization
    are fixed, so only options equal to the artifact's (or left at their defaults) are accepted.
    """
    cache = CompileCache.from_setting(compile_cache)  # a bad NX_CACHE_MAX_MB fails before any reading
    if artifacts.is_artifact(family_or_path if path is None else path):  # a saved compiled model
        options = {k: v for k, v in locals().items() if k not in ("family_or_path", "path", "registry", "cache")}
        model = artifacts.load(
            family_or_path if path is None else path,
            family=None if path is None else str(family_or_path),
            options=options,
            registry=registry,
        )
        model.compile_cache = cache  # for programs built on demand
        return model.warmup(progress) if warmup else model
    registry = registry or default_registry()
    config = RuntimeConfig.build(
        batch_size, n_positions, context_length_estimate, amp, backend, prompt_batch_size, tp_degree, devices, unroll
    )
    distributed.initialize_from_env()
    ensure_cpu_devices(config)
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
    scan.block_size(spec.n_layers, config.unroll)  # a bad unroll fails before any weight is read
    quant = as_quant_config(keep_quantized(ckpt) if quant is None else quant)  # a GGUF's blocks stay quantized
    if config.backend == "cpu" and config.amp == "f16" and quant is None:
        warnings.warn(
            "nx: amp='f16' on the CPU backend is slow: XLA:CPU has no f16 matmul kernels and converts every "
            "weight to f32 at each call (SmolLM2-135M decodes ~6x slower than in f32); use amp='bf16' or 'f32' "
            "on CPU, or int8 weights (quant='s8')",
            RuntimeWarning,
            stacklevel=2,
        )
    check_memory(family, spec, config, device_memory, quant)
    params = build_params(family, spec, hf_tensors(family, ckpt), progress=progress)
    hf_config, tokenizer_loader = ckpt.config, ckpt.tokenizer_loader(cache)
    del ckpt  # let the checkpoint and its open files go before the weights are placed
    model = NxModel(family, spec, params, config, hf_config, tokenizer_loader, quant=quant)
    model.compile_cache = cache
    if compile or warmup:
        model.compile(progress, warm=warmup)  # each program warms up as soon as it is built
    return model


def ensure_cpu_devices(config: RuntimeConfig) -> None:
    """Make enough host devices for tensor parallelism on CPU, if jax has not started yet."""
    import jax
    from jax._src import xla_bridge

    if config.backend != "cpu" or xla_bridge.backends_are_initialized() or distributed.num_processes() > 1:
        return
    need = max(config.tp_degree, 1 + max(config.devices or (0,)))
    if need > 1 and need > jax.config.jax_num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", need)


def check_memory(family: Family, spec, config: RuntimeConfig, per_device: int | None, quant: Any = None) -> None:
    """Fail before reading weights if weights + KV cache cannot fit the chosen devices."""
    import jax.numpy as jnp

    sharding.check_degree(spec, config.tp_degree)
    devs = select_devices(config)
    itemsize = jnp.dtype(AMP_DTYPES[config.amp]).itemsize
    weights, cache = memory.estimate_bytes(
        spec, family.weights(spec), config.batch_size, config.max_positions, itemsize
    )
    if quant is not None:
        check_groups(family.weights(spec), quant, config.tp_degree)
        weights = quant_weight_bytes(family.weights(spec), quant, itemsize)
    per_device = per_device or memory.device_memory(devs[0])
    memory.check_fits(weights, cache, per_device, config.tp_degree, sharding.valid_degrees(spec), len(devs[0].client.devices()))


def with_base_prefix(tensors: TensorSource, prefix: str) -> TensorSource:
    """A view adding `prefix` to every key, if no key has it yet (a bare base-model checkpoint)."""
    if not prefix or any(k.startswith(prefix) for k in tensors):
        return tensors
    return TensorSource({prefix + k: v for k, v in tensors.shapes.items()}, lambda k: tensors[k[len(prefix) :]])


def hf_tensors(family: Family, ckpt: Checkpoint) -> TensorSource:
    """The checkpoint's tensors under the HF names the family expects: GGUF files are renamed
    through the family; base-model checkpoints get the family's `base_prefix` added."""
    if ckpt.format != "gguf":
        return with_base_prefix(ckpt.tensors, family.base_prefix)
    if family.from_gguf is None:
        raise CheckpointError(f"the {family.name} family cannot load GGUF files; use an HF checkpoint directory")
    renamed: dict[str, tuple[str, Any]] = {}
    for name in ckpt.tensors:
        mapped = family.from_gguf(name, ckpt.config)
        if mapped is not None:
            renamed[mapped[0]] = (name, mapped[1])
    shapes = {hf: ckpt.tensors.shapes[g] for hf, (g, _) in renamed.items()}
    return TensorSource(shapes, lambda hf: map_rows(renamed[hf][1], ckpt.tensors[renamed[hf][0]]))
