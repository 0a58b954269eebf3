"""Compiled artifacts: ``model.save(dir)`` and ``nx.load(dir)`` without the checkpoint or a compile.

An artifact directory holds everything needed to serve:

- ``weights.safetensors``: the parameters exactly as the programs take them (tensor-parallel
  re-layout applied, int8 weights as ``<name>.q`` / ``<name>.scale``),
- ``programs/<kind>_b<rows>_...xla``: each compiled XLA executable in `nx.executables`' format
  (a JSON signature and XLA's serialized executable, no pickle: loading one runs no tracing, no
  lowering, no XLA compile and no code from the file),
- ``config.json`` (the Hugging Face config) and the tokenizer files when the model has one,
- ``nx-artifact.json``: the manifest (nx / jax / jaxlib versions, platform, device count, family,
  ModelSpec, RuntimeConfig, quantization, programs with each one's signature
  (`nx.executables.hlo_signature`: name, inputs, outputs, donated inputs), and the sha256 of
  every other file).

Executables are machine code for one jax/jaxlib version, platform and device setup, so loading
checks all of these first (and the checksums) and raises `ArtifactError` asking to recompile,
rather than handing XLA something it may crash on. Programs load when first needed (in the
background after ``nx.load``, or on first use with ``compile=False``): each file's header must
equal the manifest's signature and what the model passes the program before XLA reads the
executable, and the executable must then say the same of itself, so a swapped or foreign program
is an `ArtifactError` before its first call. The checks are integrity, not authorship: a
program is machine code, so load artifacts from places only you can write.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jaxlib
import ml_dtypes
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from nx import buckets, config, executables
from nx.buckets import ProgramKey
from nx.checkpoint import load_tokenizer
from nx.config import RuntimeConfig
from nx.errors import ArtifactError, ConfigError
from nx.hfconfig import ResolvedConfig
from nx.ops import cpu_kernels
from nx.ops.quant import QuantizedWeight, is_quantized
from nx.params import nest
from nx.quant import QuantizationConfig, as_config
from nx.sharding import tree_names
from nx.version import __version__

MANIFEST = "nx-artifact.json"
WEIGHTS = "weights.safetensors"
PROGRAMS = "programs"
#: 2: linear weights stored ``[out, in]`` and the KV-cache layout of `nx.ops.attention` (format 1: ``[in, out]``,
#: caches ``[batch, positions, kv_heads, head_dim]``); programs and weights of format 1 do not fit either.
#: 3: 16-bit KV caches are uint16 program arguments (`nx.ops.attention.cache_dtype`); a format-2 bf16/f16
#: program takes bf16/f16 caches.
#: 4: programs take each row's own cache position and per-row sampling state; insert programs.
#: 5: each program's signature in the manifest; programs named after their key.
#: 6: programs in `nx.executables`' pickle-free format; signatures read from the executables' HLO.
FORMAT = 6

def is_artifact(path: str | os.PathLike | None) -> bool:
    """Whether `path` is a directory written by `write` (it holds an ``nx-artifact.json``)."""
    return path is not None and Path(path).is_dir() and (Path(path) / MANIFEST).is_file()


# ---- environment ------------------------------------------------------------------------------
def check_environment(manifest: dict, path: Path) -> None:
    """Refuse an artifact another nx / jax version or platform built, before deserializing it."""
    fix = f"recompile it here: `nx compile ... --out {path}` or nx.load(checkpoint, ...).save({str(path)!r})"
    want = manifest.get("environment", {})
    here = {"nx_version": __version__, "jax_version": jax.__version__, "jaxlib_version": jaxlib.__version__}
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
        missing = sorted(set(want.get("cpu_features", [])) - set(executables.cpu_features()))
        if missing:
            raise ArtifactError(
                f"{str(path)!r} was compiled for a CPU with {', '.join(missing)}, which this CPU lacks; {fix}"
            )
        kernels = want.get("cpu_kernels")
        if kernels and kernels != cpu_kernels.package():
            here = cpu_kernels.package() or "no nx-kernels-cpu"
            raise ArtifactError(
                f"{str(path)!r} was compiled with {kernels} (custom CPU kernels its programs call) but this "
                f"process has {here}; install {kernels.replace(' ', '==')} or {fix}"
            )


# ---- files ------------------------------------------------------------------------------------
def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _files(manifest: dict, path: Path) -> dict:
    """The manifest's files (relative name -> sha256), each of which must exist."""
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"the manifest of {str(path)!r} lists no files; the artifact is incomplete; recompile it")
    for rel in files:
        if not (path / rel).is_file():
            raise ArtifactError(f"{str(path)!r} is incomplete: {rel} is missing; copy the whole directory or recompile it")
    return files


def verify_checksums(contents: Contents) -> None:
    """Every file's sha256 against the manifest (`ArtifactError` naming the first that differs).
    Hashing a SmolLM2 artifact takes ~0.3 s; hashlib releases the GIL, so loaders run this beside
    reading the weights (and before any program is deserialized)."""
    for rel, digest in _files(contents.manifest, contents.path).items():
        f = contents.path / rel
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
    quantized: dict[str, dict] = {}

    def note(name: Any, leaf: Any) -> None:
        if is_quantized(leaf):
            quantized[name.q.rsplit(".", 1)[0]] = {"dequant_dtype": leaf.dequant_dtype, "dtype": leaf.dtype,
                                                   "int8_dot": leaf.int8_dot, "bits": leaf.bits,
                                                   "group_size": leaf.group_size, "panel": leaf.panel}

    names = tree_names(params)
    jax.tree.map(note, names, params, is_leaf=is_quantized)
    flat = {n: np.asarray(a) for n, a in zip(jax.tree.leaves(names), jax.tree.leaves(params))}
    return flat, quantized


def _write_weights(flat: dict[str, np.ndarray], file: Path) -> None:
    stored, dtypes = {}, {}
    for name, a in flat.items():
        if a.dtype.name == "bfloat16":  # safetensors.numpy has no bf16: store the bits, note the type
            stored[name], dtypes[name] = np.ascontiguousarray(a).view(np.uint16), "bfloat16"
        else:
            stored[name] = np.ascontiguousarray(a)
    save_file(stored, str(file), metadata={"nx_dtypes": json.dumps(dtypes)})


def _read_weights(file: Path) -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    try:
        with safe_open(str(file), framework="numpy") as f:
            dtypes = json.loads((f.metadata() or {}).get("nx_dtypes", "{}"))
            for name in f.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                a = f.get_tensor(name)
                if dtypes.get(name) == "bfloat16":
                    a = a.view(ml_dtypes.bfloat16)
                out[name] = a
    except Exception as exc:
        raise ArtifactError(f"cannot read {str(file)!r}: {exc}; the artifact is damaged; recompile it") from exc
    return out


def _params_tree(flat: dict[str, np.ndarray], quantized: dict[str, dict], n_layers: int) -> dict:
    flat = dict(flat)
    for name, info in quantized.items():
        try:
            q, scale = flat.pop(f"{name}.q"), flat.pop(f"{name}.scale")
        except KeyError as exc:
            raise ArtifactError(f"the artifact's weights lack {exc.args[0]}; the artifact is damaged; recompile it") from exc
        int8_dot = info.get("int8_dot", info.get("blocked", True))  # "blocked": the CPU formulation before int8 dots
        flat[name] = QuantizedWeight(q, scale, info["dequant_dtype"], info.get("dtype"), bool(int8_dot),
                                     zero=flat.pop(f"{name}.zero", None), bits=info.get("bits", 8),
                                     group_size=info.get("group_size"), panel=bool(info.get("panel", False)))
    return nest(flat, n_layers)


# ---- write ------------------------------------------------------------------------------------
def jsonable(x: Any) -> Any:
    """Dataclasses, tuples and numpy scalars as plain JSON values (how the manifest records them)."""
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return {f.name: jsonable(getattr(x, f.name)) for f in dataclasses.fields(x)}
    if isinstance(x, dict):
        return {str(k): jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [jsonable(v) for v in x]
    if isinstance(x, (np.integer, np.floating, np.bool_)):
        return x.item()
    return x


def prepare_directory(directory: str | os.PathLike) -> Path:
    """An empty or artifact directory made ready to (over)write: until the new manifest is written
    last, it is no artifact."""
    if jax.process_count() > 1:
        raise ArtifactError("saving an artifact from a multi-process run is not supported; save from one process")
    out = Path(directory)
    if out.exists() and any(out.iterdir()) and not is_artifact(out):
        raise ArtifactError(f"{str(out)!r} exists and is not an nx artifact; choose an empty or new directory")
    if is_artifact(out):
        (out / MANIFEST).unlink()
    (out / PROGRAMS).mkdir(parents=True, exist_ok=True)
    for old in (out / PROGRAMS).glob("*.xla"):
        old.unlink()
    return out


def write(out: Path, *, programs: list[tuple[ProgramKey, bytes, dict]], params: dict, hf_config: Any, tokenizer: Any,
          header: dict) -> Path:
    """Write programs (key, bytes, `nx.executables.Program.signature`), weights (a device or host tree, per
    layer), HF config, tokenizer and the manifest (`header` plus formats, files and checksums) into
    `out` (from `prepare_directory`)."""
    entries = []
    for key, blob, sig in sorted(programs, key=lambda p: p[0]):
        rel = f"{PROGRAMS}/{key.name}.xla"
        (out / rel).write_bytes(blob)
        entries.append({**key._asdict(), "file": rel, "signature": sig})
    flat, quantized = _flat_params(params)
    _write_weights(flat, out / WEIGHTS)
    if hf_config is not None:
        hf_config.save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    files = {str(f.relative_to(out)): _sha256(f) for f in sorted(out.rglob("*")) if f.is_file() and f.name != MANIFEST}
    manifest = {**header, "format": FORMAT, "quantized": quantized, "programs": entries,
                "hf_config": hf_config is not None, "tokenizer": tokenizer is not None, "files": files,
                # resolved (defaults included), so loading needs no transformers config class
                "hf_config_resolved": ResolvedConfig.of(hf_config).to_json() if hf_config is not None else None}
    (out / MANIFEST).write_text(json.dumps(jsonable(manifest), indent=2, sort_keys=True))
    return out


# ---- read -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Contents:
    """What an artifact holds, checked: manifest, runtime config, quantization, host weights
    (nested tree) and each program's bytes by key."""

    path: Path
    manifest: dict
    config: RuntimeConfig
    quant: QuantizationConfig | None
    family: str

    def params(self, n_layers: int) -> dict:
        return _params_tree(_read_weights(self.path / WEIGHTS), self.manifest.get("quantized", {}), n_layers)

    def programs(self) -> list[tuple[ProgramKey, Path, dict]]:
        """(key, file, recorded signature) of each saved program."""
        try:
            return [(ProgramKey(int(p["rows"]), int(p["tokens"]), int(p["window"]), bool(p["sample"]),
                                bool(p.get("insert", False)), int(p.get("steps", 1))), self.path / p["file"],
                     dict(p["signature"]))
                    for p in self.manifest["programs"]]
        except (KeyError, TypeError, ValueError) as exc:
            raise ArtifactError(f"the manifest of {str(self.path)!r} lists a program without its key, file or "
                                f"signature ({exc!r}); recompile the artifact (nx compile / model.save)") from exc


def read(path: str | os.PathLike, verify: bool = True) -> Contents:
    """Open an artifact: manifest, environment (versions, platform, devices, CPU) and, with
    `verify`, every file's sha256, all checked before anything is deserialized."""
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
        family = manifest["family"]
        manifest["programs"]  # noqa: B018 (must exist)
    except (KeyError, TypeError, ValueError) as exc:
        raise ArtifactError(f"the manifest of {str(path)!r} is incomplete ({exc!r}); recompile the artifact") from exc
    return Contents(path, manifest, config, quant, family)


def verify(contents: Contents) -> None:
    """Environment and that every file is there (`read` leaves them to the caller so devices can be
    made first); the checksums are `verify_checksums`."""
    check_environment(contents.manifest, contents.path)
    _files(contents.manifest, contents.path)


def hf_config(contents: Contents) -> ResolvedConfig:
    """The Hugging Face config the artifact was built from, as resolved then."""
    try:
        return ResolvedConfig.from_json(contents.manifest.get("hf_config_resolved"))
    except ConfigError as exc:
        raise ArtifactError(f"{str(contents.path)!r} has no usable Hugging Face config ({exc}); recompile it") from exc


def tokenizer_loader(contents: Contents) -> Callable[[], Any] | None:
    return functools.partial(load_tokenizer, contents.path) if contents.manifest.get("tokenizer") else None


def warn_missing_program(path: str | os.PathLike, key: ProgramKey) -> None:
    """Log that the artifact at `path` lacks program `key`, which is compiled now, and how to save it
    in the artifact: a loaded artifact should start serving without compiling, so this is worth fixing."""
    if key.sample:
        how = "with --sampling (Python: model.save(dir, sampling=True))"
    elif key.insert:
        how = "with --serving (Python: model.save(dir, serving=True))"
    else:
        how = ("(this nx saves every greedy program a prompt up to the largest --n-positions bucket runs; "
               "longer requests need a larger --n-positions / --context-length-estimate)")
    logging.getLogger("nx.artifacts").warning(
        "the artifact %s has no program %s; compiling it now. To include it, rebuild the artifact: "
        "nx compile ... --out %s %s", path, key.name, path, how)


def check_options(contents: Contents, options: dict) -> None:
    """Options given to ``nx.load(artifact, ...)`` other than their defaults must equal the artifact's."""
    runtime, quant = contents.config, contents.manifest.get("quant")
    baked = runtime.baked(quant)
    for key in config.BAKED:
        if key not in options or options[key] == config.BY_NAME[key].default:
            continue
        given = config.BY_NAME[key].validate(options[key])
        if key == "n_positions":
            given = tuple(buckets.position_buckets(given))
        elif key == "context_length_estimate":
            given = tuple(buckets.context_buckets(given, list(runtime.n_positions)))
        elif key == "kv_dtype":
            given = None if given == runtime.amp else given
        elif key == "quant":
            given = as_config(given).to_dict() if as_config(given) else None  # "f32": no quantization
            if given and given.get("dequant_dtype") is None and quant:
                given["dequant_dtype"] = quant.get("dequant_dtype")
        if given != baked[key]:
            raise ConfigError(
                f"{str(contents.path)!r} is a compiled artifact with {key}={baked[key]!r}, but {key}={options[key]!r} "
                "was given; drop the option or recompile with it (nx compile / model.save)"
            )


def read_program(file: Path, recorded: dict) -> bytes:
    """The bytes of a saved program, whose header must be the signature the manifest records
    (checked before XLA reads anything): another signature means another program (swapped files,
    another model's), and running it would feed it buffers it was not built for."""
    blob = file.read_bytes()
    header = executables.read_header(blob)
    if {k: header.get(k) for k in recorded} != recorded:
        diff = sorted(k for k in recorded if header.get(k) != recorded[k])
        raise ArtifactError(f"its signature ({', '.join(diff)}) differs from the one the manifest records "
                            f"(program {header.get('program')!r})")
    return blob
