"""Issue #21's hardening cases, one test per category: each bad input is an `nx.NxError` subclass
with a message naming the problem, and the valid neighbours of each case still work."""

from __future__ import annotations

import errno
import json
import math
import re
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import nx
from nx.checkpoint import open_checkpoint
from nx.cli import main
from nx.compile_cache import CompileCache
from tests.cases.gpt2 import CASES as GPT2_CASES
from tests.cases.llama import CASES as LLAMA_CASES
from tests.conftest import left_padded

GPT2 = GPT2_CASES[0]  # learned position table of 256 rows
LLAMA = LLAMA_CASES[0]
SMALL = dict(n_positions=[32, 64], context_length_estimate=[8, 16], progress=False)


@pytest.fixture
def ckpt(editable_gpt2):
    return editable_gpt2


@pytest.fixture(scope="module")
def model(saved_case):
    _, path = saved_case(LLAMA)
    return nx.load("llama", path, batch_size=2, **SMALL)


def _load(path, **kw):
    kw.setdefault("n_positions", 64)
    return nx.load("gpt2", path, compile=False, progress=False, **kw)


def _edit_config(path: Path, **fields) -> None:
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(fields)
    (path / "config.json").write_text(json.dumps(cfg))


# ---- wrong results: learned positions, attention masks, non-finite weights ----------------------


def test_n_positions_beyond_a_learned_position_table_is_refused(ckpt):
    """Positions past GPT-2's table have no embedding (NaN logits before): refused at load."""
    with pytest.raises(nx.ConfigError, match=r"n_positions 512 exceeds the 256 positions .*learned position table.*n_positions <= 256"):
        _load(ckpt, n_positions=512)
    assert _load(ckpt, n_positions=256).config.max_positions == 256


@pytest.mark.parametrize("mask", [[[0, 0, 2, 2, 2], [1, 1, 1, 1, 1]], [[1, 1, 1, 1, -1], [1, 1, 1, 1, 1]]])
def test_attention_mask_must_be_zeros_and_ones(model, mask):
    ids = torch.ones(2, 5, dtype=torch.long)
    with pytest.raises(nx.InputError, match="attention_mask holds .*only 0 \\(padding\\) and 1"):
        model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_bool_attention_mask_still_works(model):
    ids, mask = left_padded([5, 3], LLAMA.vocab, seed=1)
    a = model.generate(ids, attention_mask=mask, max_new_tokens=3, eos_token_id=[])
    b = model.generate(ids, attention_mask=mask.bool(), max_new_tokens=3, eos_token_id=[])
    assert torch.equal(a, b)


@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_non_finite_weights_are_refused_naming_the_tensors(ckpt, fmt):
    state = load_file(ckpt / "model.safetensors")
    state["transformer.h.0.mlp.c_fc.weight"][3, 5] = float("nan")
    state["transformer.ln_f.bias"][0] = float("-inf")
    (ckpt / "model.safetensors").unlink()
    if fmt == "safetensors":
        save_file(state, ckpt / "model.safetensors")
    else:
        torch.save(state, ckpt / "pytorch_model.bin")
    with pytest.raises(nx.CheckpointError, match=r"transformer.h.0.mlp.c_fc.weight, transformer.ln_f.bias hold NaN or infinite"):
        _load(ckpt)


# ---- load options, config.json and checkpoint formats -----------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(n_positions="128"),
        dict(n_positions=128.5),
        dict(n_positions=True),
        dict(n_positions=[64, "128"]),
        dict(n_positions=[]),
        dict(n_positions=None),
        dict(context_length_estimate="16"),
        dict(context_length_estimate=[8.0]),
    ],
)
def test_bucket_options_take_ints_only(ckpt, kw):
    name = next(iter(kw))
    with pytest.raises(nx.ConfigError, match=f"{name} must be a positive int"):
        _load(ckpt, **kw)


def test_numpy_ints_are_bucket_sizes(ckpt):
    m = _load(ckpt, n_positions=np.int64(64), context_length_estimate=[np.int32(16)])
    assert m.config.n_positions == (64,) and m.config.context_buckets == (16,)


@pytest.mark.parametrize(
    "fields, match",
    [
        (dict(n_head=0), "n_head=0 must be a positive int"),
        (dict(n_head=3), "n_embd=64 is not divisible by n_head=3"),
        (dict(n_layer=2.5), "n_layer=2.5 must be a positive int"),
        (dict(vocab_size=-1), "vocab_size=-1 must be a positive int"),
        (dict(layer_norm_epsilon="tiny"), "not a valid config.*layer_norm_epsilon"),
        (dict(n_layer=500), "gives 500 layers but the checkpoint holds only"),
    ],
)
def test_bad_config_fields_are_config_errors(ckpt, fields, match):
    _edit_config(ckpt, **fields)
    with pytest.raises(nx.ConfigError, match=match):
        _load(ckpt)


def test_llama_heads_must_divide_hidden(saved_case, tmp_path):
    """transformers' LlamaConfig divides by the head count itself: checked before it runs."""
    _, path = saved_case(LLAMA)
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    _edit_config(tmp_path, num_attention_heads=0)
    with pytest.raises(nx.ConfigError, match="num_attention_heads=0 must be a positive int"):
        nx.load("llama", tmp_path, compile=False, **SMALL)


def test_legacy_torch_bin_loads(ckpt):
    """A pre-zip ``torch.save`` file is a valid checkpoint (still unpickled weights_only)."""
    state = load_file(ckpt / "model.safetensors")
    (ckpt / "model.safetensors").unlink()
    torch.save(state, ckpt / "pytorch_model.bin", _use_new_zipfile_serialization=False)
    tensors = open_checkpoint(ckpt).tensors
    assert set(tensors) == set(state)
    for k, v in state.items():
        np.testing.assert_array_equal(tensors[k], v.numpy())
    assert _load(ckpt).spec.n_layers == 2


def test_torch_bin_that_is_not_a_state_dict(ckpt):
    (ckpt / "model.safetensors").unlink()
    torch.save([torch.zeros(2)], ckpt / "pytorch_model.bin")
    with pytest.raises(nx.CheckpointError, match="is not a state dict"):
        _load(ckpt)


def test_unknown_model_type(ckpt):
    _edit_config(ckpt, model_type="not-a-model")
    with pytest.raises(nx.CheckpointError, match="model_type 'not-a-model', which transformers .* does not know"):
        _load(ckpt)


# ---- compile cache -------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["-1", "0", "inf", "nan", "lots"])
def test_cache_size_must_be_positive(monkeypatch, tmp_path, value):
    monkeypatch.setenv("NX_CACHE_MAX_MB", value)
    with pytest.raises(nx.ConfigError, match=f"NX_CACHE_MAX_MB='{value}' is not a size.*> 0"):
        CompileCache(tmp_path)
    with pytest.raises(nx.ConfigError, match="max_bytes is not a size"):
        CompileCache(tmp_path, max_bytes=-5)


def test_read_only_cache_with_a_damaged_entry_recompiles(saved_case, tmp_path, monkeypatch):
    """A damaged entry in a directory nx cannot write to (Errno 30 on a read-only mount) is left
    in place: nx warns once, compiles, stores nothing, and generates the same tokens."""
    _, path = saved_case(LLAMA)
    ids, mask = left_padded([6, 3], LLAMA.vocab, seed=2)
    ref = nx.load("llama", path, batch_size=2, compile_cache=tmp_path, **SMALL)
    want = ref.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[])
    entries = ref.compile_cache.entries()
    for f in entries:
        f.write_bytes(f.read_bytes()[:-7])  # damaged: the checksum no longer matches

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(Path, "unlink", read_only)
    monkeypatch.setattr("tempfile.mkstemp", read_only)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = nx.load("llama", path, batch_size=2, compile_cache=tmp_path, **SMALL)
    said = [str(w.message) for w in caught if "cannot write to the compile cache" in str(w.message)]
    assert len(said) == 1 and "Read-only file system" in said[0]
    assert m.compile_cache.misses == len(entries) and m.compile_cache.hits == 0
    assert sorted(m.compile_cache.entries()) == sorted(entries)  # nothing removed, nothing added
    assert torch.equal(m.generate(ids, attention_mask=mask, max_new_tokens=4, eos_token_id=[]), want)


# ---- generate() / stream() options -----------------------------------------------------------


@pytest.mark.parametrize(
    "kw",
    [
        dict(top_p="0.9"),
        dict(seed="abc"),
        dict(seed=1.5),
        dict(seed=2**64),
        dict(pad_token_id="x"),
        dict(stop="ab"),
        dict(stop=[[1, "a"]]),
        dict(eos_token_id=[1, -2]),
        dict(max_new_tokens=2.0),
        dict(min_new_tokens=True),
        dict(do_sample="yes"),
        dict(temperature=math.nan),
        dict(top_k=2**40),
        dict(repetition_penalty=math.inf),
        dict(streamer=object()),
        dict(output_scores="yes"),
    ],
)
def test_bad_option_values_name_the_option(model, kw):
    (name, value), = kw.items()
    with pytest.raises(nx.InputError, match=rf"^{name} must be .*, got {re.escape(repr(value)[:40])}"):
        model.generate(torch.ones(2, 3, dtype=torch.long), **{"max_new_tokens": 2, **kw})


def test_stream_checks_options_like_generate(model):
    with pytest.raises(nx.InputError, match="seed must be an int"):
        next(model.stream(torch.ones(2, 3, dtype=torch.long), max_new_tokens=2, seed="abc"))


def test_numpy_and_tuple_option_values_are_plain_values(model):
    ids = torch.ones(2, 3, dtype=torch.long)
    a = model.generate(ids, max_new_tokens=4, do_sample=True, seed=7, eos_token_id=[], stop=[[1, 2]], top_k=5)
    b = model.generate(ids, max_new_tokens=np.int64(4), do_sample=np.bool_(True), seed=np.int32(7),
                       eos_token_id=np.array([], np.int64), stop=((1, 2),), top_k=torch.tensor(5))
    assert torch.equal(a, b)


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_bad_int_list_is_a_usage_error(llama_chat_ckpt):
    res = CliRunner().invoke(main, ["generate", "llama", llama_chat_ckpt, "-p", "Hi", "--n-positions", "abc"])
    assert res.exit_code == 2 and "Traceback" not in res.output
    assert "'abc' is not an int or a comma-separated list of ints" in res.output
