"""An on-disk cache of compiled programs: loading a model again deserializes its programs
instead of compiling them, without tracing or lowering them first.

An entry's key is the sha256 of what determines the program (`nx.programs.ProgramSet.cache_key`:
the model's spec, every input's shape, dtype and placement, the XLA compiler options), plus nx's
own source code (`source_digest`: any edit to nx is a new key), the jax settings, ``XLA_FLAGS``,
the ``NX_*`` environment, the devices and `nx.executables.environment` (nx / jax / jaxlib
versions, platform, CPU features): a change to any of them makes a new entry, never a stale hit.
Each entry carries the sha256 of its bytes and is written atomically; an entry that does not
verify or load is deleted and the program compiled again. Entries hold no pickle (see
`nx.executables`), and the program one holds must be the one asked for
(`nx.programs.ProgramSet.check`): a planted or swapped entry is one that does not load. The oldest entries (by last use) go
once the cache exceeds ``$NX_CACHE_MAX_MB`` (default 2048). The tokenizers transformers converts
from GGUF metadata, and the Hugging Face configs it resolves, are kept beside them
(``tokenizers/``, ``configs/``).

The directory is ``$NX_CACHE_DIR``, else ``$XDG_CACHE_HOME/nx`` or ``~/.cache/nx``, created
private to the user; ``NX_CACHE_DIR=off`` (or ``nx.load(..., compile_cache=False)``) disables the
cache. Entries hold machine code (see `nx.executables`), so a directory that other users can
write to is refused with a warning and nothing is cached.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import shutil
import stat
import tempfile
import threading
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nx import executables
from nx.errors import ArtifactError, ConfigError

ENV = "NX_CACHE_DIR"
MAX_MB_ENV = "NX_CACHE_MAX_MB"
DEFAULT_MAX_MB = 2048
_OFF = {"0", "off", "false", "no", "none"}
_MAGIC = b"nx-compiled-program 2\n"
_SUFFIX = ".nxprog"
_SUBDIR = "programs"
_TOKENIZERS = "tokenizers"
_CONFIGS = "configs"
#: settings that do not change a program: the cache's own, and where logs and dumps go
_NOT_PROGRAM = ("NX_CACHE_DIR", "NX_CACHE_MAX_MB", "NX_DUMP_HLO")


def _max_bytes_from_env() -> int:
    """``$NX_CACHE_MAX_MB`` (MiB, default 2048) in bytes; a `ConfigError` unless it is a number > 0."""
    value = os.environ.get(MAX_MB_ENV, "").strip() or str(DEFAULT_MAX_MB)
    try:
        mb = float(value)
    except ValueError:
        mb = math.nan
    return _checked_max_bytes(mb * 2**20, f"{MAX_MB_ENV}={value!r}")


def _checked_max_bytes(value: Any, what: str) -> int:
    """`value` as a byte count > 0: a size of 0 or less would keep nothing (disable the cache with
    ``NX_CACHE_DIR=off`` instead)."""

    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 1
    if not ok:
        raise ConfigError(
            f"{what} is not a size; give the cache limit in MiB as a number > 0, e.g. {MAX_MB_ENV}=2048 "
            f"(to disable the cache set {ENV}=off)"
        )
    return int(value)


def default_directory() -> Path | None:
    """Where the cache lives unless told otherwise (None: disabled through ``NX_CACHE_DIR=off``)."""
    value = os.environ.get(ENV, "").strip()
    if value.lower() in _OFF:
        return None
    if value:
        return Path(value).expanduser()
    base = os.environ.get("XDG_CACHE_HOME", "").strip() or "~/.cache"
    return Path(base).expanduser() / "nx"


class CompileCache:
    """Compiled programs under ``directory/programs``, keyed by what they were compiled from.

    `hits` and `misses` count this object's lookups (`NxModel.compile` reports them)."""

    def __init__(self, directory: str | os.PathLike, max_bytes: int | None = None) -> None:
        self.directory = Path(directory).expanduser()
        self.max_bytes = _max_bytes_from_env() if max_bytes is None else _checked_max_bytes(max_bytes, "max_bytes")
        self.hits = 0
        self.misses = 0
        self._lock = threading.Lock()
        self._usable: bool | None = None
        self._read_only = False  # set when an entry could not be written or removed: stop trying

    @classmethod
    def from_setting(cls, setting: bool | str | os.PathLike | None = True) -> CompileCache | None:
        """`nx.load`'s ``compile_cache``: True (or None) the default directory, False none, else a directory."""
        if setting is False:
            return None
        if setting is True or setting is None:
            directory = default_directory()
            return None if directory is None else cls(directory)
        return cls(setting)

    @property
    def programs_dir(self) -> Path:
        return self.directory / _SUBDIR

    def __repr__(self) -> str:
        return f"CompileCache({str(self.directory)!r}, hits={self.hits}, misses={self.misses})"

    # ---- the one entry point -------------------------------------------------------------------
    def program(self, material: dict, devices: list, compile: Callable[[], Any], load: Callable[[bytes], Any]) -> Any:
        """The program `material` describes: `load` of a matching entry's bytes, else `compile()`,
        stored (a backend that cannot serialize, or a read-only directory, just skips storing).
        Multi-process runs (``jax.distributed``) always compile: like artifacts, their programs are
        not serialized."""
        import jax

        if jax.process_count() > 1 or not self.usable():
            return compile()
        key = self.key(material, devices)
        program = self._load(key, load)
        with self._lock:
            if program is None:
                self.misses += 1
            else:
                self.hits += 1
        if program is None:
            program = compile()
            self._store(key, program)
        return program

    def key(self, material: dict, devices: list) -> str:
        """The entry name of the program `material` describes, built for `devices`."""
        import jax

        context = {
            "program": material,
            "nx_source": source_digest(),
            "jax_config": {name: str(value) for name, value in sorted(jax.config.values.items())
                           if "cache" not in name and "log" not in name},
            "xla_flags": os.environ.get("XLA_FLAGS", ""),
            "nx_env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("NX_") and k not in _NOT_PROGRAM},
            "environment": executables.environment(devices),
            "devices": [int(d.id) for d in devices],
        }
        return hashlib.sha256(json.dumps(context, sort_keys=True, default=str).encode()).hexdigest()

    # ---- GGUF tokenizers and resolved configs -----------------------------------------------
    def tokenizer(self, digest: str, build: Callable[[], Any]) -> Any:
        """The tokenizer of a GGUF file whose metadata has sha256 `digest`: its saved JSON files if
        cached (SmolLM2: 0.1 s), else `build()` (transformers converts the GGUF vocabulary: ~3 s),
        saved for next time. Keyed by the transformers version too, which does the conversion."""
        if not self.usable():
            return build()
        where = self.directory / _TOKENIZERS / f"{digest}-transformers-{_transformers_version()}"
        if (where / "tokenizer_config.json").is_file():
            from nx.checkpoint import load_tokenizer

            tok = load_tokenizer(where)
            if tok is not None:
                return tok
            shutil.rmtree(where, ignore_errors=True)  # damaged: convert again
        tok = build()
        if tok is not None:
            tmp = None
            try:
                where.parent.mkdir(mode=0o700, exist_ok=True)
                tmp = tempfile.mkdtemp(dir=where.parent, prefix=".tmp-")
                tok.save_pretrained(tmp)
                os.replace(tmp, where)  # whole or not at all
            except OSError:  # read-only, full, or another process saved it first
                if tmp is not None:
                    shutil.rmtree(tmp, ignore_errors=True)
        return tok

    def hf_config(self, raw: dict, build: Callable[[], Any]) -> Any:
        """The `nx.hfconfig.ResolvedConfig` of config fields `raw`: saved from an earlier load, else
        `build()` (transformers' config class, which imports torch) resolved and saved. Keyed by
        the fields and the transformers version, which supplies the defaults."""
        from nx.hfconfig import ResolvedConfig

        if not self.usable():
            return ResolvedConfig.of(build())
        text = json.dumps(raw, sort_keys=True, default=str) + _transformers_version()
        return self._saved_json(text, lambda: ResolvedConfig.of(build()).to_json(), ResolvedConfig.from_json)

    def gguf_fields(self, digest: str, build: Callable[[], dict]) -> dict:
        """The HF config fields of a GGUF file whose metadata has sha256 `digest`: saved from an
        earlier load, else `build()` (`nx.checkpoint.gguf_config`, which imports transformers for
        its GGUF key tables: ~0.5 s) and saved. Keyed by the transformers version too."""
        if not self.usable():
            return build()
        return self._saved_json(f"gguf {digest} {_transformers_version()}", build, _fields)

    def _saved_json(self, text: str, build: Callable[[], Any], parse: Callable[[Any], Any]) -> Any:
        """``parse`` of the JSON value saved under the sha256 of `text` in ``configs/``; when there is
        none, or it does not parse (`ValueError` / `ConfigError`: damaged), ``parse(build())``, saved
        atomically (not saved when the directory is read-only or full: built again next time)."""
        f = self.directory / _CONFIGS / (hashlib.sha256(text.encode()).hexdigest() + ".json")
        try:
            return parse(json.loads(f.read_text()))
        except (OSError, ValueError, ConfigError):  # not saved yet, or damaged: build again
            pass
        value = build()
        tmp = None
        try:
            data = json.dumps(value, default=str)
            f.parent.mkdir(mode=0o700, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=f.parent, prefix=".tmp-", suffix=".json")
            with os.fdopen(fd, "w") as out:
                out.write(data)
            os.replace(tmp, f)  # whole or not at all
        except (OSError, TypeError, ValueError):  # read-only or full: build again next time
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
        return parse(value)

    def tokenizer_dirs(self) -> list[Path]:
        d = self.directory / _TOKENIZERS
        return sorted(p for p in d.iterdir() if p.is_dir() and not p.name.startswith(".")) if d.is_dir() else []

    # ---- entries -------------------------------------------------------------------------------
    def usable(self) -> bool:
        """Whether the directory exists (it is created private) and only its owner can write to it."""
        if self._usable is None:
            self._usable = self._check_directory()
        return self._usable

    def _check_directory(self) -> bool:
        d = self.programs_dir
        try:
            d.mkdir(mode=0o700, parents=True, exist_ok=True)
            for p in (self.directory, d):
                st = p.stat()
                foreign = hasattr(os, "getuid") and st.st_uid != os.getuid()
                if foreign or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
                    warnings.warn(
                        f"nx: not using the compile cache {str(p)!r}: other users can write to it and its "
                        f"entries are machine code; make it private (chmod 700) or set {ENV} to another "
                        f"directory (or {ENV}=off)", RuntimeWarning, stacklevel=4,
                    )
                    return False
        except OSError as exc:
            warnings.warn(f"nx: compile cache {str(d)!r} unavailable ({exc}); compiling without it",
                          RuntimeWarning, stacklevel=4)
            return False
        return True

    def _sized_entries(self) -> list[tuple[Path, int]]:
        """(entry, bytes) of the cached programs, least recently used first (one stat each)."""
        if not self.programs_dir.is_dir():
            return []
        found = []
        for f in self.programs_dir.glob("*" + _SUFFIX):
            try:
                st = f.stat()
            except FileNotFoundError:  # removed by another process meanwhile
                continue
            found.append((st.st_mtime, f, st.st_size))
        return [(f, size) for _, f, size in sorted(found)]

    def entries(self) -> list[Path]:
        """The cached programs, least recently used first."""
        return [f for f, _ in self._sized_entries()]

    def size_bytes(self) -> int:
        return sum(size for _, size in self._sized_entries())

    def clear(self) -> int:
        """Delete every program, cached tokenizer and resolved config; returns how many programs
        there were."""
        entries = self.entries()
        for f in entries:
            f.unlink(missing_ok=True)
        for d in self.tokenizer_dirs():
            shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(self.directory / _CONFIGS, ignore_errors=True)
        return len(entries)

    def _path(self, key: str) -> Path:
        return self.programs_dir / (key + _SUFFIX)

    def _load(self, key: str, deserialize: Callable[[bytes], Any]) -> Any:
        f = self._path(key)
        try:
            data = f.read_bytes()
        except OSError:
            return None
        head = len(_MAGIC) + 64
        blob = data[head:]
        if data[: len(_MAGIC)] != _MAGIC or data[len(_MAGIC) : head].decode("ascii", "replace") != hashlib.sha256(blob).hexdigest():
            self._remove(f)  # truncated or damaged: compile again
            return None
        try:
            exe = deserialize(blob)
        except Exception:  # XLA's own error types: an entry this jaxlib cannot load
            self._remove(f)
            return None
        with contextlib.suppress(OSError):
            os.utime(f)  # last use, for pruning
        return exe

    def _remove(self, f: Path) -> None:
        """Delete entry `f`; in a directory nx cannot write to, leave it (see `_cannot_write`)."""
        try:
            f.unlink(missing_ok=True)
        except OSError as exc:
            self._cannot_write(exc)

    def _cannot_write(self, exc: OSError) -> None:
        """The directory refused a write or a delete (read-only, full, not ours): warn once, then
        compile without storing; entries that load are still used."""
        with self._lock:
            if self._read_only:
                return
            self._read_only = True
        warnings.warn(
            f"nx: cannot write to the compile cache {str(self.programs_dir)!r} ({exc}); programs are compiled "
            f"but not stored. Make it writable, or set {ENV} to another directory (or {ENV}=off)",
            RuntimeWarning, stacklevel=5,
        )

    def _store(self, key: str, program: Any) -> None:
        if self._read_only:
            return
        try:
            blob = program.to_bytes()
        except ArtifactError:  # this backend cannot serialize: nothing to cache
            return
        data = _MAGIC + hashlib.sha256(blob).hexdigest().encode("ascii") + blob
        try:
            fd, tmp = tempfile.mkstemp(dir=self.programs_dir, prefix=".tmp-", suffix=_SUFFIX)
            try:
                with os.fdopen(fd, "wb") as out:
                    out.write(data)
                os.replace(tmp, self._path(key))  # readers never see a partial entry
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        except OSError as exc:  # full or read-only disk: run uncached
            self._cannot_write(exc)
            return
        self.prune()

    def prune(self) -> None:
        """Delete the least recently used entries until the cache fits `max_bytes`."""
        entries = self._sized_entries()
        total = sum(size for _, size in entries)
        for f, size in entries:
            if total <= self.max_bytes or self._read_only:
                break
            self._remove(f)
            total -= size


@functools.cache
def source_digest() -> str:
    """sha256 of nx's own source files (every ``.py`` under the package, by path and content):
    programs are built by this code, so an edited nx never reuses another's programs."""
    root = Path(__file__).parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()


def _fields(value: Any) -> dict:
    """Saved GGUF config fields as they were saved; a `ValueError` for anything else (damaged)."""
    if not isinstance(value, dict):
        raise ValueError("saved GGUF config fields are not a JSON object")
    return value


def _transformers_version() -> str:
    """The installed transformers' version, without importing it (that takes most of a second)."""
    from importlib.metadata import version

    return version("transformers")
