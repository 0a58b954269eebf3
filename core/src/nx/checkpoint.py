"""Checkpoint readers: HF directories (safetensors, sharded safetensors, pytorch_model.bin) and
llama.cpp GGUF files. Each yields the HF config and a lazy name -> numpy tensor source.

Pickled ``.bin`` files are opened with ``torch.load(weights_only=True)``, which refuses arbitrary
code; nx never unpickles untrusted data any other way.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from nx import gguf_quant, memory
from nx.errors import CheckpointError, ConfigError, NxError
from nx.gguf_quant import QuantizedTensors
from nx.hfconfig import check_raw_config

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_BIN = "pytorch_model.bin"
TORCH_BIN_INDEX = "pytorch_model.bin.index.json"


class TensorSource(Mapping[str, np.ndarray]):
    """Read-only mapping of checkpoint tensor names to f32 numpy arrays, loaded on access."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], read: Callable[[str], np.ndarray]) -> None:
        self.shapes = shapes
        self._read = read

    def __getitem__(self, key: str) -> np.ndarray:
        """The tensor as numpy; a `CheckpointError` naming it if it cannot be read (the readers,
        safetensors, gguf-py and torch, raise assorted error types on damaged files)."""
        if key not in self.shapes:
            raise KeyError(key)
        try:
            return self._read(key)
        except NxError:
            raise
        except Exception as exc:
            raise CheckpointError(
                f"cannot read tensor {key!r}: {type(exc).__name__}: {exc}; the checkpoint is corrupt, truncated "
                "or stores it in a type nx cannot use (re-save or re-convert it)"
            ) from exc

    def __iter__(self) -> Iterator[str]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


@dataclass
class Checkpoint:
    """A checkpoint on disk: its HF config, tensors, and where to find the tokenizer."""

    path: Path
    config: Any  # nx.hfconfig.ResolvedConfig
    tensors: TensorSource
    format: str
    gguf_file: str | None = None
    gguf_digest: str | None = None  # sha256 of a GGUF file's metadata (vocabulary, chat template ...)
    #: A GGUF file's tensors with quantized blocks kept in nx's layouts (`nx.gguf_quant.keep_quantized`).
    gguf_quantized: Any = None

    @property
    def gguf_quantized_tensors(self) -> TensorSource | None:
        if self.gguf_quantized is None:
            return None
        return TensorSource(self.tensors.shapes, self.gguf_quantized)

    @property
    def model_type(self) -> str:
        return self.config.model_type

    def tokenizer_loader(self, cache: Any = None) -> Callable[[], Any]:
        """`load_tokenizer` for later, without keeping the checkpoint (and its open files) alive.
        A GGUF file's tokenizer goes through `cache` (an `nx.compile_cache.CompileCache`) if given."""
        load = functools.partial(load_tokenizer, self.path, self.gguf_file)
        if cache is None or self.gguf_digest is None:
            return load
        return functools.partial(cache.tokenizer, self.gguf_digest, load)


#: Files a Hugging Face tokenizer is read from (any one kind is enough), as error messages name them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json + merges.txt",
                   "vocab.txt")


def load_tokenizer(path: Path, gguf_file: str | None = None):
    """The tokenizer in checkpoint directory `path` (or in its `gguf_file`), or None if it has no
    usable one (`usable_tokenizer`)."""
    try:
        if gguf_file:
            from transformers import AutoTokenizer

            return usable_tokenizer(AutoTokenizer.from_pretrained(str(path), gguf_file=gguf_file))
        return usable_tokenizer(_tokenizer_class(path).from_pretrained(str(path)))
    except (OSError, ValueError, TypeError):
        return None


#: tokenizer classes transformers 5 builds as its generic `tokenizers` backend
_GENERIC_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def _tokenizer_class(path: Path) -> Any:
    """The class to load `path`'s tokenizer with: the generic fast tokenizer when its
    ``tokenizer_config.json`` names it (as nx's saved tokenizers do), since ``AutoTokenizer``
    imports every model config class and torch with them (seconds); else ``AutoTokenizer``."""
    try:
        named = json.loads((path / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        named = None
    if named in _GENERIC_TOKENIZERS and (path / "tokenizer.json").is_file():
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast
    from transformers import AutoTokenizer

    return AutoTokenizer


def usable_tokenizer(tok: Any) -> Any:
    """`tok` if it turns text into token ids, else None: transformers builds an empty tokenizer
    (no vocabulary, "a" encodes to nothing) from some directories instead of failing."""
    try:
        if tok is None or len(tok) == 0 or not tok.encode("a", add_special_tokens=False):
            return None
    except Exception:  # a tokenizer that cannot even encode "a" is no tokenizer
        return None
    return tok


def missing_tokenizer(where: str | os.PathLike, needed_by: str) -> CheckpointError:
    """The error for a model without a usable tokenizer where `needed_by` needs one for text."""
    return CheckpointError(
        f"{str(where)!r} has no usable tokenizer (looked for {', '.join(TOKENIZER_FILES)} beside config.json, "
        f"or the tokenizer metadata of a .gguf file); {needed_by} needs one to turn text into token ids. "
        "Copy the tokenizer files of the original model into the checkpoint directory "
        "(model.generate(ids) with token ids needs none)"
    )


def _to_numpy(t) -> np.ndarray:
    import torch

    if t.dtype in (torch.bfloat16, torch.float16, torch.float64):
        t = t.float()
    return t.numpy()


def resolve(path: str | os.PathLike) -> tuple[Path, str | None]:
    """Split a user path into (directory, gguf file name or None); fail clearly if unusable."""
    p = Path(path).expanduser()
    if not p.exists():
        raise CheckpointError(f"checkpoint path {str(p)!r} does not exist; pass a model directory or a .gguf file")
    if p.is_file():
        if p.suffix != ".gguf":
            raise CheckpointError(
                f"{str(p)!r} is a file but not a .gguf; pass the directory holding config.json and the weights"
            )
        return p.parent, p.name
    ggufs = sorted(f.name for f in p.glob("*.gguf"))
    if not (p / "config.json").exists() and len(ggufs) == 1:
        return p, ggufs[0]
    return p, None


def open_checkpoint(path: str | os.PathLike, cache: Any = None) -> Checkpoint:
    """Open an HF model directory or a .gguf file (config first; tensors load lazily). Its config
    is resolved through `cache` (an `nx.compile_cache.CompileCache`) if given: a config resolved
    before loads without transformers' config classes."""
    directory, gguf_file = resolve(path)
    if gguf_file:
        return _open_gguf(directory, gguf_file, cache)
    cfg_path = directory / "config.json"
    if not cfg_path.exists():
        raise CheckpointError(
            f"{str(directory)!r} has no config.json (nor a single .gguf file); "
            "save the model with save_pretrained() or point at the .gguf file"
        )
    config = _read_config(cfg_path, cache)
    for name, opener in (
        (SAFETENSORS_INDEX, _open_safetensors_index),
        (SAFETENSORS, _open_safetensors),
        (TORCH_BIN_INDEX, _open_torch_index),
        (TORCH_BIN, _open_torch_bin),
    ):
        if (directory / name).exists():
            return Checkpoint(directory, config, opener(directory / name), name)
    raise CheckpointError(
        f"no weights in {str(directory)!r}: expected {SAFETENSORS}, {SAFETENSORS_INDEX}, {TORCH_BIN} "
        f"or {TORCH_BIN_INDEX} next to config.json"
    )


def _read_config(path: Path, cache: Any = None):
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({exc}); re-save the checkpoint") from exc
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise CheckpointError(f"{str(path)!r} has no 'model_type' string; it is not a Hugging Face model config")
    check_raw_config(raw, str(path))

    def build():
        from transformers import CONFIG_MAPPING, AutoConfig

        if raw["model_type"] not in CONFIG_MAPPING:
            raise CheckpointError(
                f"{str(path)!r} has model_type {raw['model_type']!r}, which transformers {_transformers_version()} "
                "does not know; upgrade transformers or check config.json"
            )
        return AutoConfig.from_pretrained(str(path.parent))

    return resolved_config(raw, build, str(path), cache)


def resolved_config(raw: dict, build: Callable[[], Any], where: str, cache: Any = None):
    """The `nx.hfconfig.ResolvedConfig` of config fields `raw`, which `build()` makes into a
    transformers config: through `cache` if given (see `CompileCache.hf_config`)."""
    from nx.hfconfig import ResolvedConfig

    def make():
        return _hf_config(build, where)

    return cache.hf_config(raw, make) if cache is not None else ResolvedConfig.of(make())


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _hf_config(build: Callable[[], Any], where: str):
    """`build()` (transformers making a config); a field of the wrong type or value (transformers 5
    validates them strictly, with its own error types) is a `ConfigError` quoting its message."""
    from huggingface_hub.errors import StrictDataclassError

    try:
        return build()
    except (ValueError, KeyError, TypeError, ArithmeticError, AttributeError, StrictDataclassError) as exc:
        raise ConfigError(f"{where} is not a valid config: {exc}; fix the config") from exc


def _open_safetensors(file: Path) -> TensorSource:
    return _safetensors_files({None: file})


def _open_safetensors_index(index: Path) -> TensorSource:
    weight_map = _read_index(index)
    files = {name: index.parent / fname for name, fname in weight_map.items()}
    return _safetensors_files(files)


def _read_index(index: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError) as exc:
        raise CheckpointError(f"{str(index)!r} is not a valid index file ({exc!r}); re-save the checkpoint") from exc
    for fname in sorted(set(weight_map.values())):
        if not (index.parent / fname).exists():
            raise CheckpointError(f"shard {fname!r} named in {index.name} is missing from {str(index.parent)!r}")
    return weight_map


def _safetensors_files(files: dict[str | None, Path]) -> TensorSource:
    """`files` maps tensor name -> file (or None -> the single file). Read without torch: the
    safetensors library checks each file and reads every dtype numpy has; bf16 tensors, which
    numpy lacks, are read from the offsets of the (checked) header and widened to f32."""
    from safetensors import safe_open

    def handle(f: Path):
        """A fresh handle per use: a file's memory map (and the pages a read touched, which count in
        the process's resident memory) is released as soon as the read is done."""
        try:
            return safe_open(str(f), framework="numpy")
        except Exception as exc:  # safetensors raises its own error types
            raise CheckpointError(f"cannot read {str(f)!r}: {exc}; the file is corrupt or truncated") from exc

    shapes: dict[str, tuple[int, ...]] = {}
    where: dict[str, Path] = {}
    dtypes: dict[str, str] = {}
    for f in sorted(set(files.values())):
        with handle(f) as h:
            for key in h.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                piece = h.get_slice(key)
                shapes[key], dtypes[key], where[key] = tuple(piece.get_shape()), piece.get_dtype(), f

    def read(key: str) -> np.ndarray:
        try:
            if dtypes[key] == "BF16":
                return _read_bf16(where[key], key, shapes[key])
            with handle(where[key]) as h:
                a = h.get_tensor(key)
        except NxError:
            raise
        except Exception as exc:
            raise CheckpointError(f"cannot read tensor {key!r} from {str(where[key])!r}: {exc}") from exc
        return a.astype(np.float32) if a.dtype in (np.float16, np.float64) else a

    return TensorSource(shapes, read)


def _read_bf16(file: Path, key: str, shape: tuple[int, ...]) -> np.ndarray:
    """bf16 tensor `key` of a safetensors file (already opened once by the library, so its header
    is valid) as f32: a bf16 is the top half of the f32 with the same bits."""
    with open(file, "rb") as f:
        (size,) = np.frombuffer(f.read(8), "<u8")
        header = json.loads(f.read(int(size)))
    begin, end = header[key]["data_offsets"]
    bits = np.fromfile(file, "<u2", count=(end - begin) // 2, offset=8 + int(size) + begin)
    return (bits.astype(np.uint32) << 16).view(np.float32).reshape(shape)


def _torch_load(file: Path) -> dict:
    """A ``torch.save`` file's state dict, unpickled with ``weights_only=True`` (never runs code).
    Zip files (torch >= 1.6) are memory-mapped; the legacy format cannot be and is read whole."""
    import pickle
    import zipfile

    import torch

    try:
        state = torch.load(str(file), map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(file))
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"{str(file)!r} contains objects other than tensors and was not loaded (nx only loads "
            f"weights_only pickles); convert it to safetensors: {exc}"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read {str(file)!r}: {exc}; the file is corrupt or truncated") from exc
    if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()):
        raise CheckpointError(
            f"{str(file)!r} is not a state dict (a dict of name -> tensor); save model.state_dict(), "
            "or save_pretrained()"
        )
    return state


def _torch_state(states: list[dict]) -> TensorSource:
    merged: dict[str, Any] = {}
    for s in states:
        merged.update(s)
    return TensorSource({k: tuple(v.shape) for k, v in merged.items()}, lambda k: _to_numpy(merged[k]))


def _open_torch_bin(file: Path) -> TensorSource:
    return _torch_state([_torch_load(file)])


def _open_torch_index(index: Path) -> TensorSource:
    weight_map = _read_index(index)
    return _torch_state([_torch_load(index.parent / f) for f in sorted(set(weight_map.values()))])


def unpermute_gguf_rotary(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (its converter interleaves each head's halves)."""
    dim = w.shape[0] // n_heads // 2
    return w.reshape(n_heads, dim, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_config(reader) -> dict:
    """HF config fields from GGUF metadata, using transformers' own key tables.

    Faster than ``transformers``' ``load_gguf_checkpoint``, which also parses the whole vocabulary.
    """
    from transformers.integrations.ggml import GGUF_CONFIG_DEFAULTS_MAPPING, GGUF_CONFIG_MAPPING

    fields = reader.fields
    arch = fields["general.architecture"].contents() if "general.architecture" in fields else None
    if arch not in GGUF_CONFIG_MAPPING:
        raise CheckpointError(f"GGUF architecture {arch!r} is not supported; nx reads {sorted(GGUF_CONFIG_MAPPING)}")
    cfg: dict = dict(GGUF_CONFIG_DEFAULTS_MAPPING.get(arch, {}))
    for prefix, table in ((arch, GGUF_CONFIG_MAPPING[arch]), ("tokenizer", GGUF_CONFIG_MAPPING["tokenizer"])):
        for key, hf_key in table.items():
            f = fields.get(f"{prefix}.{key}")
            if f is not None and hf_key is not None and hf_key != -1:
                cfg[hf_key] = f.contents()
    embed = next((t for t in reader.tensors if t.name == "token_embd.weight"), None)
    if "vocab_size" not in cfg and embed is not None:  # many files leave it to the vocabulary's length
        cfg["vocab_size"] = int(embed.shape[-1])
    cfg["tie_word_embeddings"] = all(t.name != "output.weight" for t in reader.tensors)
    cfg["model_type"] = arch
    return cfg


def gguf_reader(file: str | os.PathLike):
    """A `gguf.GGUFReader` of `file` that parses ~3x faster (SmolLM2: 1.8 -> 0.56 s).

    The reader slices its ``np.memmap`` once per metadata item (~500k slices for a 49k-token
    vocabulary) and memmap slices are slow to make; this one slices a plain array view of the same
    mapping instead.
    """
    import gguf

    class Reader(gguf.GGUFReader):
        @property
        def data(self):
            return self._plain

        @data.setter
        def data(self, mapped):
            self._plain = mapped.view(np.ndarray)  # still backed by (and keeping alive) the mapping

        def _get_field_parts(self, orig_offs: int, raw_type: int):
            # A long array (the vocabulary, its scores and merges) is stepped over, not split into a
            # part per item: nx reads only scalars and short lists; transformers reads the vocabulary
            # itself when it converts the tokenizer.
            if raw_type != gguf.GGUFValueType.ARRAY:
                return super()._get_field_parts(orig_offs, raw_type)
            itype = self._get(orig_offs, np.uint32)
            alen = self._get(orig_offs + 4, np.uint64)
            if int(alen[0]) <= _LISTED_ITEMS:
                return super()._get_field_parts(orig_offs, raw_type)
            end = _skip_items(self._plain, orig_offs + 12, int(itype[0]), int(alen[0]), self.gguf_scalar_to_np)
            return end - orig_offs, [itype, alen], [], [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType(int(itype[0]))]

    return Reader(str(file))


#: GGUF arrays up to this long are read item by item; longer ones are skipped (see `gguf_reader`)
_LISTED_ITEMS = 1024


def _skip_items(data: np.ndarray, offset: int, item_type: int, count: int, scalars: dict) -> int:
    """The offset just past `count` GGUF items of type `item_type` starting at `offset`
    (`ValueError` if they run past the end: a damaged file)."""
    import gguf

    kind = gguf.GGUFValueType(item_type)
    if kind in scalars:
        end = offset + count * np.dtype(scalars[kind]).itemsize
    elif kind == gguf.GGUFValueType.STRING:
        raw, end = data.data, offset
        for _ in range(count):  # each string: a u64 length, then its bytes
            if end + 8 > len(data):
                break
            end += 8 + int.from_bytes(raw[end : end + 8], "little")
    else:
        raise ValueError(f"a GGUF array of {kind.name} items is not supported")
    if end > len(data):
        raise ValueError("a GGUF metadata array runs past the end of the file")
    return end


def _open_gguf(directory: Path, fname: str, cache: Any = None) -> Checkpoint:
    import gguf

    file = directory / fname
    try:
        reader = gguf_reader(file)
    except Exception as exc:
        raise CheckpointError(f"cannot read GGUF file {str(file)!r}: {exc}; it is corrupt or truncated") from exc
    digest = hashlib.sha256(reader.data[: reader.data_offset]).hexdigest()  # header, metadata, tensor index

    def fields() -> dict:
        try:
            return gguf_config(reader)
        except NxError:
            raise
        except Exception as exc:  # metadata of unexpected types
            raise CheckpointError(f"GGUF file {str(file)!r} has unreadable metadata ({exc}); it is corrupt") from exc

    cfg = fields() if cache is None else cache.gguf_fields(digest, fields)  # no transformers import when saved
    check_raw_config(cfg, f"GGUF file {str(file)!r}")
    reader.fields.clear()  # metadata (the whole vocabulary as small arrays) is not needed after this
    memory.return_freed_memory()  # the parsed metadata (the whole vocabulary) back to the OS before the weights load
    def build():
        from transformers import AutoConfig

        fields = dict(cfg)
        return AutoConfig.for_model(fields.pop("model_type"), **fields)

    config = resolved_config(cfg, build, f"GGUF file {str(file)!r}", cache)
    tensors = {t.name: t for t in reader.tensors}

    def read(name: str) -> np.ndarray:
        t = tensors[name]
        data = gguf_quant.dequantize(t.data, t.tensor_type.name)  # the common block types, faster
        if data is None:
            data = gguf.quants.dequantize(t.data, t.tensor_type)
        return np.asarray(data, dtype=np.float32).reshape([int(d) for d in reversed(t.shape)])

    source = TensorSource({n: tuple(int(d) for d in reversed(t.shape)) for n, t in tensors.items()}, read)
    quantized = QuantizedTensors(file, reader.tensors, read)
    return Checkpoint(directory, config, source, "gguf", gguf_file=fname, gguf_digest=digest, gguf_quantized=quantized)
