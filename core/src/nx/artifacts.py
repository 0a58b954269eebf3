"""Compiled artifacts: ``model.save(dir)`` and ``nx.load(dir)`` without the checkpoint or a compile.

An artifact directory holds everything needed to serve:

- ``weights.safetensors``: the parameters exactly as the programs take them (tensor-parallel
  re-layout applied, int8 weights as ``<name>.q`` / ``<name>.scale``),
- ``programs/<kind>_b<rows>_...xla``: each compiled XLA executable, serialized with
  ``jax.experimental.serialize_executable`` (loading deserializes it: no tracing, no lowering, no
  XLA compile),
- ``config.json`` (the Hugging Face config) and the tokenizer files when the model has one,
- ``nx-artifact.json``: the manifest (nx / jax / jaxlib versions, platform, device count, family,
  ModelSpec, RuntimeConfig, quantization, programs, and the sha256 of every other file).

Executables are machine code for one jax/jaxlib version, platform and device setup, so loading
checks all of these first (and the checksums) and raises `ArtifactError` asking to recompile,
rather than handing XLA something it may crash on. Like any pickle, a serialized executable can
run code when loaded: only load artifacts you built or trust.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from nx import executables
from nx.checkpoint import load_tokenizer
from nx.dump import program_name
from nx.errors import ArtifactError, ConfigError

MANIFEST = "nx-artifact.json"
WEIGHTS = "weights.safetensors"
PROGRAMS = "programs"
#: 2: linear weights stored ``[out, in]`` and the KV-cache layout of `nx.ops.attention` (format 1: ``[in, out]``,
#: caches ``[batch, positions, kv_heads, head_dim]``); programs and weights of format 1 do not fit either.
#: 3: 16-bit KV caches are uint16 program arguments (`nx.ops.attention.cache_dtype`); a format-2 bf16/f16
#: program takes bf16/f16 caches.
FORMAT = 3

#: CPU features an XLA:CPU executable may have been compiled to use (it targets the host CPU).
_CPU_FEATURES = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw",
                 "avx512dq", "avx512vl", "avx512cd", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                 "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


def is_artifact(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a directory written by `save` (it holds an ``nx-artifact.json``)."""
    return path is not None and Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


# ---- environment ------------------------------------------------------------------------------
def _cpu_features() -> list[str]:
    from nx.xla_options import cpu_flags

    return sorted(cpu_flags() & set(_CPU_FEATURES))


def environment(model: Any) -> dict:
    """What a serialized executable depends on: versions, platform, devices (and CPU features)."""
    import jax
    import jaxlib

    import nx

    dev = model.device
    env = {
        "nx_version": nx.__version__,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "platform": dev.platform,
        "platform_version": dev.client.platform_version,
        "device_kind": dev.device_kind,
        "device_count": int(model.mesh.devices.size),
        "process_device_count": len(jax.devices(dev.platform)),
    }
    if dev.platform == "cpu":
        env["cpu_features"] = _cpu_features()
    return env


def _check_environment(manifest: dict, path: Path) -> None:
    """Refuse an artifact another nx / jax version or platform built, before deserializing it."""
    import jax
    import jaxlib

    import nx

    fix = f"recompile it here: `nx compile ... --out {path}` or nx.load(checkpoint, ...).save({str(path)!r})"
    want = manifest.get("environment", {})
    here = {"nx_version": nx.__version__, "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__}
    for key, value in here.items():
        if want.get(key) != value:
            what = key.replace("_version", "")
            raise ArtifactError(
                f"{str(path)!r} was compiled with {what} {want.get(key)} but this is {what} {value}; compiled "
                f"programs only load in the version that built them; {fix}"
            )
    platform = want.get("platform")
    try:
        devices = jax.devices(platform)
    except RuntimeError as exc:
        raise ArtifactError(f"{str(path)!r} was compiled for platform {platform!r}, which is not available here "
                            f"({exc}); {fix}") from exc
    dev = devices[0]
    if dev.client.platform_version != want.get("platform_version") or dev.device_kind != want.get("device_kind"):
        raise ArtifactError(
            f"{str(path)!r} was compiled for {platform} {want.get('platform_version')!r} ({want.get('device_kind')}) but "
            f"this machine has {dev.client.platform_version!r} ({dev.device_kind}); {fix}"
        )
    need = int(want.get("device_count", 1))
    if need > len(devices):
        raise ArtifactError(
            f"{str(path)!r} was compiled for {need} {platform} devices but this process has {len(devices)}; "
            f"start it with {need} devices (on CPU: JAX_NUM_CPU_DEVICES={need}) or {fix}"
        )
    if platform == "cpu":
        missing = sorted(set(want.get("cpu_features", [])) - set(_cpu_features()))
        if missing:
            raise ArtifactError(
                f"{str(path)!r} was compiled for a CPU with {', '.join(missing)}, which this CPU lacks; {fix}"
            )


# ---- files ------------------------------------------------------------------------------------
def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _verify_files(manifest: dict, path: Path) -> None:
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"the manifest of {str(path)!r} lists no files; the artifact is incomplete; recompile it")
    for rel, digest in files.items():
        f = path / rel
        if not f.is_file():
            raise ArtifactError(f"{str(path)!r} is incomplete: {rel} is missing; copy the whole directory or recompile it")
        if _sha256(f) != digest:
            raise ArtifactError(
                f"{str(f)!r} is corrupt or truncated (sha256 differs from the manifest); copy the artifact again "
                "or recompile it (nx compile / model.save)"
            )


def read_manifest(path: str | os.PathLike) -> dict:
    """The parsed manifest of an artifact directory (`ArtifactError` if unreadable)."""
    p = Path(path) / MANIFEST
    try:
        manifest = json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"cannot read {str(p)!r} ({exc}); the artifact is damaged; recompile it") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(
            f"{str(p)!r} has artifact format {manifest.get('format') if isinstance(manifest, dict) else None!r}; this "
            f"nx reads format {FORMAT}; recompile it with this nx (nx compile / model.save)"
        )
    return manifest


# ---- weights ----------------------------------------------------------------------------------
def _flat_params(params: Any) -> tuple[dict[str, np.ndarray], dict[str, dict]]:
    """Host arrays by dotted name, and the quantized weights' static fields (dequant dtype ...)."""
    import jax

    from nx.ops.quant import is_quantized
    from nx.sharding import tree_names

    quantized: dict[str, dict] = {}

    def note(name: Any, leaf: Any) -> None:
        if is_quantized(leaf):
            quantized[name.q.rsplit(".", 1)[0]] = {"dequant_dtype": leaf.dequant_dtype, "dtype": leaf.dtype,
                                                   "int8_dot": leaf.int8_dot, "bits": leaf.bits,
                                                   "group_size": leaf.group_size}

    names = tree_names(params)
    jax.tree.map(note, names, params, is_leaf=is_quantized)
    flat = {n: np.asarray(a) for n, a in zip(jax.tree.leaves(names), jax.tree.leaves(params))}
    return flat, quantized


def _write_weights(flat: dict[str, np.ndarray], file: Path) -> None:
    from safetensors.numpy import save_file

    stored, dtypes = {}, {}
    for name, a in flat.items():
        if a.dtype.name == "bfloat16":  # safetensors.numpy has no bf16: store the bits, note the type
            stored[name], dtypes[name] = np.ascontiguousarray(a).view(np.uint16), "bfloat16"
        else:
            stored[name] = np.ascontiguousarray(a)
    save_file(stored, str(file), metadata={"nx_dtypes": json.dumps(dtypes)})


def _read_weights(file: Path) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(file), framework="numpy") as f:
            dtypes = json.loads((f.metadata() or {}).get("nx_dtypes", "{}"))
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                a = f.get_tensor(name)
                if dtypes.get(name) == "bfloat16":
                    import ml_dtypes

                    a = a.view(ml_dtypes.bfloat16)
                out[name] = a
    except Exception as exc:
        raise ArtifactError(f"cannot read {str(file)!r}: {exc}; the artifact is damaged; recompile it") from exc
    return out


def _params_tree(flat: dict[str, np.ndarray], quantized: dict[str, dict], n_layers: int) -> dict:
    from nx.ops.quant import QuantizedWeight
    from nx.params import nest

    flat = dict(flat)
    for name, info in quantized.items():
        try:
            q, scale = flat.pop(f"{name}.q"), flat.pop(f"{name}.scale")
        except KeyError as exc:
            raise ArtifactError(f"the artifact's weights lack {exc.args[0]}; the artifact is damaged; recompile it") from exc
        int8_dot = info.get("int8_dot", info.get("blocked", True))  # "blocked": the CPU formulation before int8 dots
        flat[name] = QuantizedWeight(q, scale, info["dequant_dtype"], info.get("dtype"), bool(int8_dot),
                                     zero=flat.pop(f"{name}.zero", None), bits=info.get("bits", 8),
                                     group_size=info.get("group_size"))
    return nest(flat, n_layers)


# ---- save ---------------------------------------------------------------------------------------
def _jsonable(x: Any) -> Any:
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: _jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    return x


def save(model: Any, directory: str | os.PathLike, *, sampling: bool = False, progress: bool | None = None,
         workers: int | None = None) -> Path:
    """Write `model` as a compiled artifact to `directory` (see the module docstring).

    Every bucket's greedy program is compiled first (`workers` at a time, see `NxModel.compile`)
    if it is not yet (``sampling=True`` adds the sampling variants so sampled generation needs no
    compile either); programs compiled on demand before (e.g. chunked prefill shapes) are saved
    too. Returns the directory.
    """
    import jax

    if jax.process_count() > 1:
        raise ArtifactError("saving an artifact from a multi-process run is not supported; save from one process")
    out = Path(directory)
    if out.exists() and any(out.iterdir()) and not is_artifact(out):
        raise ArtifactError(f"{str(out)!r} exists and is not an nx artifact; choose an empty or new directory")
    if is_artifact(out):  # overwriting: until the new manifest is written last, it is no artifact
        (out / MANIFEST).unlink()
    shapes = list(model.program_shapes())
    if sampling:
        shapes += [(r, t, w, True) for r, t, w, _ in shapes]
    model.compile(progress, workers=workers, shapes=shapes)
    (out / PROGRAMS).mkdir(parents=True, exist_ok=True)
    for old in (out / PROGRAMS).glob("*.xla"):
        old.unlink()

    programs = []
    for key, exe in sorted(model._executables.items()):
        rows, n_tokens, window, sample = key
        blob = executables.to_bytes(exe)
        rel = f"{PROGRAMS}/{program_name(*key)}.xla"
        (out / rel).write_bytes(blob)
        programs.append({"rows": rows, "tokens": n_tokens, "window": window, "sample": sample, "file": rel})

    flat, quantized = _flat_params({**model.params, "layers": model.layer_params()})  # per layer, whatever unroll
    _write_weights(flat, out / WEIGHTS)
    has_config = model.hf_config is not None
    if has_config:
        model.hf_config.save_pretrained(str(out))
    tok = model.tokenizer
    if tok is not None:
        tok.save_pretrained(str(out))

    files = {
        str(f.relative_to(out)): _sha256(f) for f in sorted(out.rglob("*")) if f.is_file() and f.name != MANIFEST
    }
    cfg = model.config
    manifest = {
        "format": FORMAT,
        "environment": environment(model),
        "family": model.family.name,
        "plugin": {"distribution": model.family.distribution, "version": model.family.version},
        "spec": _jsonable(model.spec),
        "runtime": _jsonable(cfg),
        "buckets": {"n_positions": list(cfg.n_positions), "context_length_estimate": list(cfg.context_buckets)},
        "quant": model.quant.to_dict() if getattr(model, "quant", None) is not None else None,
        "quantized": quantized,
        "programs": programs,
        "hf_config": has_config,
        "tokenizer": tok is not None,
        "files": files,
    }
    (out / MANIFEST).write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return out


# ---- load ---------------------------------------------------------------------------------------
#: `nx.load` options baked into an artifact (passing a different value is an error).
_BAKED = ("batch_size", "prompt_batch_size", "n_positions", "context_length_estimate", "amp", "backend",
          "tp_degree", "devices", "quant", "unroll")


def _check_options(runtime: Any, quant: dict | None, options: dict, path: Path) -> None:
    """Options given to ``nx.load(artifact, ...)`` other than their defaults must match the artifact."""
    from nx import buckets
    from nx.loader import load as nx_load
    from nx.quant import as_config

    defaults = {k: p.default for k, p in inspect.signature(nx_load).parameters.items()}
    baked = {
        "batch_size": runtime.batch_size,
        "prompt_batch_size": runtime.prompt_batch_size,
        "n_positions": tuple(runtime.n_positions),
        "context_length_estimate": tuple(runtime.context_buckets),
        "amp": runtime.amp,
        "backend": runtime.backend,
        "tp_degree": runtime.tp_degree,
        "devices": runtime.devices,
        "quant": quant,
        "unroll": runtime.unroll,
    }
    for key in _BAKED:
        if key not in options or options[key] == defaults.get(key):
            continue
        given = options[key]
        if key == "n_positions":
            given = tuple(buckets.position_buckets(given))
        elif key == "context_length_estimate":
            given = tuple(buckets.context_buckets(given, list(runtime.n_positions)))
        elif key == "devices":
            given = tuple(int(d) for d in given)
        elif key == "quant":
            given = as_config(given).to_dict() if as_config(given) else None  # "f32": no quantization
            if given and given.get("dequant_dtype") is None and quant:
                given["dequant_dtype"] = quant.get("dequant_dtype")
        elif key == "prompt_batch_size" and given is None:
            continue
        if given != baked[key]:
            raise ConfigError(
                f"{str(path)!r} is a compiled artifact with {key}={baked[key]!r}, but {key}={options[key]!r} was given; "
                "drop the option or recompile with it (nx compile / model.save)"
            )


def load(
    path: str | os.PathLike,
    *,
    family: str | None = None,
    options: dict | None = None,
    registry: Any = None,
    verify: bool = True,
) -> Any:
    """Restore an `NxModel` from an artifact directory with no XLA compile.

    `family`, if given, must be the artifact's. `options` are the keyword arguments given to
    ``nx.load``; those that differ from their defaults must equal what the artifact was compiled
    with. ``verify=False`` skips the sha256 checks (the version/platform checks always run).
    """
    from nx.loader import ensure_cpu_devices
    from nx.model import NxModel, RuntimeConfig
    from nx.quant import QuantizationConfig
    from nx.registry import default_registry

    path = Path(path)
    manifest = read_manifest(path)
    try:
        rt = dict(manifest["runtime"])
        for k in ("n_positions", "context_buckets"):
            rt[k] = tuple(rt[k])
        if rt.get("devices") is not None:
            rt["devices"] = tuple(rt["devices"])
        config = RuntimeConfig(**rt)
        quant = QuantizationConfig.from_dict(manifest["quant"]) if manifest.get("quant") else None
        programs = manifest["programs"]
        fam_name = manifest["family"]
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"the manifest of {str(path)!r} is incomplete ({exc!r}); recompile the artifact") from exc
    if family is not None and family != fam_name:
        raise ConfigError(f"{str(path)!r} is a compiled {fam_name!r} artifact, not {family!r}; use nx.load({str(path)!r})")
    _check_options(config, manifest.get("quant"), options or {}, path)
    ensure_cpu_devices(config)
    _check_environment(manifest, path)
    if verify:
        _verify_files(manifest, path)

    fam = (registry or default_registry()).get(fam_name)
    if not manifest.get("hf_config"):
        raise ArtifactError(f"{str(path)!r} has no config.json (the model had no Hugging Face config); recompile it")
    from transformers import AutoConfig

    hf_config = AutoConfig.from_pretrained(str(path))
    spec = fam.spec_from_config(hf_config)
    if _jsonable(spec) != manifest.get("spec"):
        raise ArtifactError(
            f"the installed {fam_name} plugin ({fam.distribution} {fam.version}) describes this model differently "
            f"from the one that compiled {str(path)!r} ({manifest.get('plugin')}); recompile the artifact"
        )
    params = _params_tree(_read_weights(path / WEIGHTS), manifest.get("quantized", {}), spec.n_layers)
    tokenizer_loader = functools.partial(load_tokenizer, path) if manifest.get("tokenizer") else None
    model = NxModel(fam, spec, params, config, hf_config, tokenizer_loader, quant=quant, prepared=True)
    _load_programs(model, programs, path)
    model.artifact_path = path
    return model


def _load_programs(model: Any, programs: list[dict], path: Path) -> None:
    """Deserialize the saved programs into `model`, several at a time (threads: XLA loads outside
    the GIL; SmolLM2's 11 programs 2.5 -> 1.6 s on 2 cores), then hand the heap XLA freed while
    loading back to the OS (~150-190 MB for those 11)."""
    from concurrent.futures import ThreadPoolExecutor

    from nx.memory import return_freed_memory
    from nx.xla_options import default_workers

    def load(prog: dict) -> tuple[tuple[int, int, int, bool], Any]:
        key = (int(prog["rows"]), int(prog["tokens"]), int(prog["window"]), bool(prog["sample"]))
        blob = (path / prog["file"]).read_bytes()
        try:
            exe = executables.from_bytes(blob, model)
        except Exception as exc:  # XLA reports its own error types
            raise ArtifactError(
                f"cannot load the compiled program {prog['file']} of {str(path)!r}: {exc}; recompile the artifact"
            ) from exc
        return key, exe

    with ThreadPoolExecutor(max_workers=default_workers()) as pool:
        model._executables.update(pool.map(load, programs))
    return_freed_memory()
