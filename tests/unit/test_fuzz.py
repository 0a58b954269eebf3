"""Property-based fuzzing of every input nx parses: safetensors headers, GGUF headers and
metadata, config.json fields and generate() arguments. Whatever hypothesis draws, the outcome is
success or an `nx.NxError` subclass: never another exception type, a hang or a crash.

Bounded: each fuzzer runs a fixed number of examples (all of them together take well under the
suite's budget on 2 cores); no example database is written.
"""

from __future__ import annotations

import json
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import nx
from nx.checkpoint import open_checkpoint
from nx.loader import hf_tensors
from nx.params import build_params
from nx.registry import default_registry
from tests.cases.gpt2 import CASES as GPT2_CASES
from tests.cases.llama import CASES as LLAMA_CASES


def fuzz(examples: int):
    """Hypothesis settings of one fuzzer: `examples` examples, no per-example deadline (the first
    example may compile a program), no database left in the repository."""
    return settings(
        max_examples=examples, deadline=None, database=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
    )


def nx_error_or_success(run: Callable[[], Any]) -> None:
    """`run()` returns, or raises an `nx.NxError` whose message is not empty."""
    try:
        run()
        event("success")  # `pytest --hypothesis-show-statistics` shows how often each outcome came
    except nx.NxError as exc:
        event(type(exc).__name__)
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
    except Exception as exc:  # the property under test: nothing else escapes
        raise AssertionError(f"{type(exc).__name__} escaped instead of an nx.NxError: {exc}") from exc


#: JSON-like values of every kind a hand-edited or hostile file may hold.
ANY_JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**66), 2**66) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=6,
)


def mostly(valid: st.SearchStrategy, odd: st.SearchStrategy, one_in: int = 4) -> st.SearchStrategy:
    """`odd` once in `one_in` draws, else `valid` (a plain ``|`` would flatten `odd`'s many branches
    and draw valid values rarely, so few examples would get past the first check)."""
    return st.integers(1, one_in).flatmap(lambda i: odd if i == 1 else valid)




def near(value: Any) -> st.SearchStrategy:
    """A config field's value, something close to it (a size doubled, halved, off by one), or any
    JSON value."""
    if isinstance(value, int) and not isinstance(value, bool):
        valid = st.sampled_from([value, value, 2 * value, max(value // 2, 1), value + 1, 0, -value])
    else:
        valid = st.just(value)
    return mostly(valid, ANY_JSON)


def _read_everything(path: Path) -> None:
    """Open a checkpoint, build its spec and every parameter (no device, no compile)."""
    ckpt = open_checkpoint(path)
    family = default_registry().for_model_type(ckpt.model_type)
    spec = family.spec_from_config(ckpt.config)
    nx.spec.check_load(spec, 64, len(ckpt.tensors))
    build_params(family, spec, hf_tensors(family, ckpt), progress=False)


@pytest.fixture(scope="module")
def gpt2_dir(saved_case):
    return Path(saved_case(GPT2_CASES[0])[1])


@pytest.fixture(scope="module")
def llama_dir(saved_case):
    return Path(saved_case(LLAMA_CASES[0])[1])


def _copy(src: Path) -> Path:
    d = Path(tempfile.mkdtemp(prefix="nx-fuzz-"))
    shutil.copytree(src, d, dirs_exist_ok=True)
    return d


# ---- safetensors ---------------------------------------------------------------------------

DTYPES = st.sampled_from(["F32", "F16", "BF16", "F64", "I64", "I32", "I8", "U8", "BOOL", "F8_E4M3", "C64", "X"]) | ANY_JSON


@fuzz(200)
@given(data=st.data())
def test_fuzz_safetensors_header(gpt2_dir, data):
    """Edit one tensor's header entry (dtype, shape, offsets) or the header bytes themselves."""
    d = _copy(gpt2_dir)
    try:
        f = d / "model.safetensors"
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header, body = json.loads(raw[8 : 8 + n]), raw[8 + n :]
        names = sorted(k for k in header if k != "__metadata__")
        how = data.draw(st.sampled_from(["entry", "bytes", "length"]))
        if how == "entry":
            entry = header[data.draw(st.sampled_from(names))]
            field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
            ints = st.lists(st.integers(-(2**65), 2**65) | st.integers(0, len(body)), max_size=3)
            entry[field] = data.draw(DTYPES if field == "dtype" else ints | ANY_JSON)
            text = json.dumps(header).encode()
            raw = struct.pack("<Q", len(text)) + text + body
        elif how == "bytes":
            at = data.draw(st.integers(0, 8 + n - 1))
            raw = raw[:at] + data.draw(st.binary(min_size=1, max_size=8)) + raw[at + 1 :]
        else:
            raw = struct.pack("<Q", data.draw(st.integers(0, 2**64 - 1))) + raw[8 : data.draw(st.integers(8, len(raw)))]
        f.write_bytes(raw)
        nx_error_or_success(lambda: _read_everything(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- GGUF ----------------------------------------------------------------------------------

def _gguf_metadata() -> dict[str, tuple[Any, str]]:
    """A tiny llama's GGUF metadata: key -> (value, GGUFValueType name)."""
    return {
        "llama.block_count": (1, "UINT32"),
        "llama.context_length": (64, "UINT32"),
        "llama.embedding_length": (8, "UINT32"),
        "llama.feed_forward_length": (16, "UINT32"),
        "llama.attention.head_count": (2, "UINT32"),
        "llama.attention.head_count_kv": (1, "UINT32"),
        "llama.rope.freq_base": (10000.0, "FLOAT32"),
        "llama.attention.layer_norm_rms_epsilon": (1e-5, "FLOAT32"),
        "llama.vocab_size": (16, "UINT32"),
    }


#: A GGUF value of a type drawn with it: (value, GGUFValueType name).
GGUF_VALUES = st.one_of(
    st.tuples(st.integers(0, 2**32 - 1), st.just("UINT32")),
    st.tuples(st.integers(-(2**31), 2**31 - 1), st.just("INT32")),
    st.tuples(st.integers(0, 2**64 - 1), st.just("UINT64")),
    st.tuples(st.floats(width=32), st.just("FLOAT32")),
    st.tuples(st.booleans(), st.just("BOOL")),
    st.tuples(st.text(max_size=6), st.just("STRING")),
)


def _write_gguf(path: Path, metadata: dict[str, tuple[Any, str]], tensors: dict[str, tuple[np.ndarray, str]]) -> None:
    import gguf

    w = gguf.GGUFWriter(str(path), "llama")
    for key, (value, kind) in metadata.items():
        w.add_key_value(key, value, gguf.GGUFValueType[kind])
    for name, (array, kind) in tensors.items():
        qtype = gguf.GGMLQuantizationType[kind]
        data = gguf.quants.quantize(array, qtype) if kind == "Q8_0" else array
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def _gguf_tensors() -> dict[str, tuple[np.ndarray, str]]:
    rng = np.random.default_rng(0)
    return {
        "token_embd.weight": (rng.standard_normal((16, 8), dtype=np.float32), "F32"),
        "output_norm.weight": (np.ones(8, np.float32), "F32"),
        "blk.0.ffn_down.weight": (rng.standard_normal((8, 32), dtype=np.float32), "Q8_0"),
    }


@fuzz(200)
@given(data=st.data())
def test_fuzz_gguf(data):
    """Edit metadata values (config fields and their types), or bytes of the header, metadata and
    tensor index, or truncate the file."""
    d = Path(tempfile.mkdtemp(prefix="nx-fuzz-"))
    try:
        meta = _gguf_metadata()
        how = data.draw(st.sampled_from(["metadata", "bytes", "truncate"]))
        if how == "metadata":
            keys = data.draw(st.lists(st.sampled_from(sorted(meta)), min_size=1, max_size=3, unique=True))
            for key in keys:
                if data.draw(st.booleans()):
                    meta[key] = data.draw(GGUF_VALUES)
                else:
                    del meta[key]
        f = d / "model.gguf"
        _write_gguf(f, meta, _gguf_tensors())
        raw = f.read_bytes()
        if how == "bytes":
            for _ in range(data.draw(st.integers(1, 4))):
                at = data.draw(st.integers(0, min(len(raw), 1024) - 1))
                raw = raw[:at] + data.draw(st.binary(min_size=1, max_size=8)) + raw[at + 1 :]
        elif how == "truncate":
            raw = raw[: data.draw(st.integers(0, len(raw) - 1))]
        f.write_bytes(raw)
        nx_error_or_success(lambda: _read_everything(f))
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- config.json ---------------------------------------------------------------------------

GPT2_FIELDS = ["n_embd", "n_head", "n_layer", "n_positions", "n_inner", "vocab_size", "layer_norm_epsilon",
               "activation_function", "tie_word_embeddings", "scale_attn_weights", "model_type"]
LLAMA_FIELDS = ["hidden_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers", "head_dim",
                "intermediate_size", "rms_norm_eps", "hidden_act", "rope_scaling", "rope_theta",
                "max_position_embeddings", "tie_word_embeddings"]


@fuzz(200)
@given(data=st.data())
def test_fuzz_config_fields(gpt2_dir, llama_dir, data):
    """Set up to three fields of a tiny gpt2 or llama config.json to drawn values, then load."""
    family, src, fields = data.draw(st.sampled_from([("gpt2", gpt2_dir, GPT2_FIELDS), ("llama", llama_dir, LLAMA_FIELDS)]))
    d = _copy(src)
    try:
        cfg = json.loads((d / "config.json").read_text())
        for name in data.draw(st.lists(st.sampled_from(fields), min_size=1, max_size=3, unique=True)):
            cfg[name] = data.draw(near(cfg.get(name)))
        (d / "config.json").write_text(json.dumps(cfg))
        nx_error_or_success(lambda: _read_everything(d))
    finally:
        shutil.rmtree(d, ignore_errors=True)


# ---- generate() ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def model(llama_dir):
    return nx.load("llama", llama_dir, batch_size=2, n_positions=[32], context_length_estimate=[8], progress=False)


ODD = (
    st.none() | st.booleans() | st.integers(-(2**65), 2**65) | st.floats() | st.text(max_size=4)
    | st.lists(st.integers(-3, 300) | st.text(max_size=2), max_size=3)
    | st.lists(st.lists(st.integers(-3, 300), max_size=3), max_size=3)
    | st.integers(-3, 300).map(np.int64) | st.floats(0, 2).map(np.float32)
)


def valid_or_odd(valid: st.SearchStrategy) -> st.SearchStrategy:
    return mostly(valid, ODD, one_in=12)


#: Values each option accepts (mostly) or rejects (sometimes).
OPTIONS = {
    "min_new_tokens": valid_or_odd(st.integers(0, 3)),
    "do_sample": valid_or_odd(st.booleans()),
    "temperature": valid_or_odd(st.floats(0.1, 3)),
    "top_k": valid_or_odd(st.none() | st.integers(1, 300)),
    "top_p": valid_or_odd(st.floats(0.01, 1)),
    "repetition_penalty": valid_or_odd(st.floats(0.5, 2)),
    "seed": valid_or_odd(st.integers(0, 2**40)),
    "eos_token_id": valid_or_odd(st.integers(0, 255) | st.lists(st.integers(0, 300), max_size=3)),
    "pad_token_id": valid_or_odd(st.integers(0, 255)),
    "stop": valid_or_odd(st.lists(st.integers(0, 255), max_size=2)),
    "output_scores": valid_or_odd(st.booleans()),
    "return_dict": valid_or_odd(st.booleans()),
}
PROMPTS = mostly(
    st.lists(st.lists(st.integers(0, 255), min_size=3, max_size=3), min_size=2, max_size=2),
    st.lists(st.lists(st.integers(-5, 400), min_size=0, max_size=40), min_size=0, max_size=3) | ODD,
    one_in=12,
)
LEFT_PADDED = st.lists(st.integers(0, 2), min_size=2, max_size=2).map(lambda pads: [[0] * p + [1] * (3 - p) for p in pads])
MASKS = mostly(
    st.none() | LEFT_PADDED,
    st.lists(st.lists(st.integers(-1, 2), min_size=3, max_size=3), min_size=2, max_size=2) | ODD,
    one_in=12,
)


@fuzz(200)
@given(
    options=st.dictionaries(st.sampled_from(sorted(OPTIONS)), st.none(), max_size=5).flatmap(
        lambda keys: st.fixed_dictionaries({"max_new_tokens": valid_or_odd(st.integers(1, 6)), **{k: OPTIONS[k] for k in keys}})
    ),
    ids=PROMPTS,
    mask=MASKS,
    streaming=st.booleans(),
)
def test_fuzz_generate_arguments(model, options, ids, mask, streaming):
    if streaming:
        options.pop("output_scores", None)
        options.pop("return_dict", None)
        nx_error_or_success(lambda: list(model.stream(ids, attention_mask=mask, **options)))
    else:
        nx_error_or_success(lambda: model.generate(ids, attention_mask=mask, **options))

