"""`nx.load`: checkpoint -> family -> spec -> parameters -> compiled `NxModel`."""

from __future__ import annotations

import functools
import inspect
import logging
import os
import threading
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import jax
import jax.numpy as jnp
from jax._src import xla_bridge

from nx import artifacts, distributed, memory, scan, sharding
from nx import config as config_mod
from nx.checkpoint import Checkpoint, TensorSource, open_checkpoint
from nx.compile_cache import CompileCache
from nx.config import RuntimeConfig
from nx.errors import ArtifactError, CheckpointError, ConfigError
from nx.family import Family
from nx.gguf_quant import keep_quantized
from nx.model import NxModel
from nx.params import build_params
from nx.placement import AMP_DTYPES, select_devices
from nx.quant import as_config as as_quant_config
from nx.quant import check_groups, map_rows
from nx.quant import weight_bytes as quant_weight_bytes
from nx.registry import Registry, default_registry
from nx.spec import check_load


def load(family_or_path: str | os.PathLike, path: str | os.PathLike | None = None, *,
         registry: Registry | None = None, **options: Any) -> NxModel:
    """Load a checkpoint (or a compiled artifact) and compile it.

    ``nx.load("llama", path)`` uses the named family; ``nx.load(path)`` infers it from the
    checkpoint's ``model_type``. `path` is an HF model directory (safetensors, sharded safetensors
    or pytorch_model.bin) or a ``.gguf`` file, or a directory written by ``model.save`` /
    ``nx compile``, restored with its compiled programs (its baked options are fixed: only equal
    values are accepted). Options (`nx.config.OPTIONS`, each checked before any file is read):

{options}
    """
    opts = config_mod.validate(options)
    cache = CompileCache.from_setting(opts["compile_cache"])  # a bad NX_CACHE_MAX_MB fails before any reading
    target = family_or_path if path is None else path
    if artifacts.is_artifact(target):
        model = load_artifact(target, None if path is None else str(family_or_path), options, registry,
                              preload_tokenizer=opts["preload_tokenizer"])
        model.compile_cache = cache  # for programs built on demand
        if opts["warmup"]:
            return model.warmup(opts["progress"])
        if opts["compile"]:
            model.programs.prefetch(model.programs.offered)  # saved programs load while the caller goes on
        return model
    registry = registry or default_registry()
    config = RuntimeConfig.build(**{k: opts[k] for k in RUNTIME_OPTIONS})
    distributed.initialize_from_env()
    ensure_cpu_devices(config)
    if path is None:
        ckpt = open_checkpoint(family_or_path, cache)
        family = registry.for_model_type(ckpt.model_type)
    else:
        family = registry.get(str(family_or_path))  # unknown family fails before touching the disk
        ckpt = open_checkpoint(path, cache)
        if ckpt.model_type not in family.model_types:
            raise CheckpointError(
                f"{str(path)!r} is a {ckpt.model_type!r} checkpoint but family {family.name!r} accepts "
                f"{', '.join(family.model_types)}; leave the family out to pick it from the checkpoint: "
                f"nx.load({str(path)!r}) in Python, nx generate {path} (or nx chat, serve ...) on the command line"
            )
    tokenizer_loader = tokenizer(ckpt.tokenizer_loader(cache), opts["preload_tokenizer"])
    spec = family.spec_from_config(ckpt.config)
    check_load(spec, config.max_positions, len(ckpt.tensors))  # before any weight is read
    scan.block_size(spec.n_layers, config.unroll)  # a bad unroll fails before any weight is read
    quant = gguf_quant(opts["quant"], ckpt, family, spec, config, opts["device_memory"])
    if config.backend == "cpu" and config.amp == "f16" and quant is None:
        warnings.warn(
            "nx: amp='f16' on the CPU backend is slow: XLA:CPU has no f16 matmul kernels and converts every "
            "weight to f32 at each call; use amp='bf16' or 'f32' on CPU, or int8 weights (quant='s8')",
            RuntimeWarning,
            stacklevel=2,
        )
    check_memory(family, spec, config, opts["device_memory"], quant)
    params = build_params(family, spec, hf_tensors(family, ckpt), progress=opts["progress"])
    hf_config = ckpt.config
    del ckpt  # let the checkpoint and its open files go before the weights are placed
    model = NxModel(family, spec, params, config, hf_config, tokenizer_loader, quant=quant)
    model.compile_cache = cache
    if opts["compile"] or opts["warmup"]:
        model.compile(opts["progress"], warm=opts["warmup"])  # each program warms up as soon as it is built
    return model


load.__signature__ = config_mod.signature(  # type: ignore[attr-defined]
    [inspect.Parameter("family_or_path", inspect.Parameter.POSITIONAL_OR_KEYWORD),
     inspect.Parameter("path", inspect.Parameter.POSITIONAL_OR_KEYWORD, default=None),
     inspect.Parameter("registry", inspect.Parameter.KEYWORD_ONLY, default=None)])
load.__doc__ = load.__doc__.format(options=config_mod.options_doc())  # type: ignore[union-attr]
log = logging.getLogger("nx")
RUNTIME_OPTIONS = ("batch_size", "prompt_batch_size", "n_positions", "context_length_estimate", "amp", "backend",
                   "tp_degree", "devices", "unroll", "decode_steps", "kv_dtype")


def load_artifact(path: str | os.PathLike, family: str | None = None, options: dict | None = None,
                  registry: Registry | None = None, verify: bool = True, preload_tokenizer: bool = False) -> NxModel:
    """Restore an `NxModel` from an artifact directory with no XLA compile. `family`, if given, must
    be the artifact's; `options` given to ``nx.load`` that differ from their defaults must equal the
    artifact's. ``verify=False`` skips the sha256 checks (the version/platform checks always run);
    `preload_tokenizer` loads the tokenizer beside the weights (see `tokenizer`)."""
    contents = artifacts.read(path)
    if family is not None and family != contents.family:
        raise ConfigError(f"{str(path)!r} is a compiled {contents.family!r} artifact, not {family!r}; leave the "
                          f"family out: nx.load({str(path)!r}) in Python, nx generate {path} on the command line")
    artifacts.check_options(contents, options or {})
    ensure_cpu_devices(contents.config)
    artifacts.check_environment(contents.manifest, contents.path)
    if verify:
        artifacts.verify(contents)
    fam = (registry or default_registry()).get(contents.family)
    hf_config = artifacts.hf_config(contents)
    tokenizer_loader = tokenizer(artifacts.tokenizer_loader(contents), preload_tokenizer)
    spec = fam.spec_from_config(hf_config)
    if artifacts.jsonable(spec) != contents.manifest.get("spec"):
        raise ArtifactError(
            f"the installed {fam.name} plugin ({fam.distribution} {fam.version}) describes this model differently "
            f"from the one that compiled {str(path)!r} ({contents.manifest.get('plugin')}); recompile the artifact"
        )
    with ThreadPoolExecutor(max_workers=1) as pool:  # checksums hashed while the weights are read
        checked = pool.submit(artifacts.verify_checksums, contents) if verify else None
        try:
            model = NxModel(fam, spec, contents.params(spec.n_layers), contents.config, hf_config,
                            tokenizer_loader, quant=contents.quant, prepared=True)
        except Exception:
            if checked is not None:
                checked.result()  # a damaged file explains a failed read best
            raise
        if checked is not None:
            checked.result()
    for key, file, recorded in contents.programs():  # each loads, checked, when first needed
        model.programs.offer(key, functools.partial(artifacts.read_program, file, recorded),
                             f"{file.parent.name}/{file.name} of {str(contents.path)!r}")
    model.artifact_path = contents.path
    model.programs.on_missing = functools.partial(artifacts.warn_missing_program, contents.path)
    return model


def tokenizer(load: Callable[[], Any], preload: bool) -> Callable[[], Any]:
    """The model's tokenizer loader: `load` itself (the tokenizer loads on first use), or with
    `preload` the same started now on a daemon thread (`in_background`). Why: a tokenizer is ~0.8 s
    of Python (transformers' import and its construction) that can run while numpy and XLA read
    and place the weights."""
    return in_background(load, "nx-tokenizer") if preload else load


def in_background(load: Callable[[], Any], name: str) -> Callable[[], Any]:
    """`load()` started now on a daemon thread named `name`; the returned callable waits for its
    result (or raises its error)."""
    result: Future = Future()

    def run() -> None:
        try:
            result.set_result(load())
        except BaseException as exc:  # handed to whoever waits for it
            result.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    return result.result


def gguf_quant(requested: Any, ckpt: Checkpoint, family: Family, spec, config: RuntimeConfig,
               per_device: int | None) -> Any:
    """The quantization a load runs with. ``quant="gguf"`` keeps a GGUF file's quantized blocks
    (`nx.gguf_quant`); by default they are kept only when the dequantized f32 weights would not
    fit the devices (a 7B Q4 file on a small machine), since the grouped kernels are slower than
    f32 ones on the CPU; either way the choice is logged."""
    if requested == "gguf":
        kept = keep_quantized(ckpt)
        if kept is None:
            raise ConfigError(f"quant='gguf' keeps a GGUF file's quantized blocks, but {str(ckpt.path)!r} holds "
                              "none nx reads quantized (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K); drop quant or use 's8' / 's4'")
        return kept
    if requested is not None or getattr(ckpt, "gguf_quantized", None) is None:
        return as_quant_config(requested)
    weights, cache, per_device, _ = _sizes(family, spec, config, per_device)
    if weights + cache <= per_device * config.tp_degree:
        log.info("GGUF holds quantized blocks: dequantizing them to %s (they fit, and float kernels are faster "
                 "here); quant='gguf' keeps them quantized", config.amp)
        return None
    return keep_quantized(ckpt)


def _sizes(family: Family, spec, config: RuntimeConfig, per_device: int | None) -> tuple[int, int, int, list]:
    """(unquantized weight bytes, KV cache bytes, bytes per device, the devices) of a load."""
    devs = select_devices(config)
    itemsize = jnp.dtype(AMP_DTYPES[config.amp]).itemsize
    weights, cache = memory.estimate_bytes(spec, family.weights(spec), config.batch_size, config.max_positions, itemsize,
                                           jnp.dtype(AMP_DTYPES[config.cache_dtype]).itemsize)
    return weights, cache, per_device or memory.device_memory(devs[0]), devs


def ensure_cpu_devices(config: RuntimeConfig) -> None:
    """Make enough host devices for tensor parallelism on CPU, if jax has not started yet."""

    if config.backend != "cpu" or xla_bridge.backends_are_initialized() or distributed.num_processes() > 1:
        return
    need = max(config.tp_degree, 1 + max(config.devices or (0,)))
    if need > 1 and need > jax.config.jax_num_cpu_devices:
        jax.config.update("jax_num_cpu_devices", need)


def check_memory(family: Family, spec, config: RuntimeConfig, per_device: int | None, quant: Any = None) -> None:
    """Fail before reading weights if weights + KV cache cannot fit the chosen devices."""

    sharding.check_degree(spec, config.tp_degree)
    weights, cache, per_device, devs = _sizes(family, spec, config, per_device)
    if quant is not None:
        check_groups(family.weights(spec), quant, config.tp_degree)
        weights = quant_weight_bytes(family.weights(spec), quant, jnp.dtype(AMP_DTYPES[config.amp]).itemsize)
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
