"""Every user-facing error: raised early, an `nx.NxError`, and saying what to do."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

import nx
from tests.cases.gpt2 import CASES as GPT2_CASES
from tests.cases.llama import CASES as LLAMA_CASES

GPT2 = GPT2_CASES[0]
LLAMA = LLAMA_CASES[0]


@pytest.fixture
def ckpt(editable_gpt2):
    return editable_gpt2


@pytest.fixture(scope="module")
def small_model(saved_case):
    _, path = saved_case(LLAMA)
    return nx.load("llama", path, batch_size=2, n_positions=[32, 64], context_length_estimate=[8, 16], progress=False)


def _load(path, **kw):
    kw.setdefault("n_positions", 64)  # within the tiny gpt2's learned position table (256)
    return nx.load("gpt2", path, compile=False, progress=False, **kw)


def test_all_errors_share_the_root():
    for cls in (nx.UnknownFamilyError, nx.CheckpointError, nx.WeightKeyError, nx.ShapeMismatchError,
                nx.ConfigError, nx.InputError, nx.BucketError, nx.PluginError):
        assert issubclass(cls, nx.NxError)


def test_unknown_family(ckpt):
    with pytest.raises(nx.UnknownFamilyError, match=r"installed families: .*gpt2.*pip install nx-plugin-falcon"):
        nx.load("falcon", ckpt)


def test_missing_path(tmp_path):
    with pytest.raises(nx.CheckpointError, match="does not exist"):
        _load(tmp_path / "nope")


def test_directory_without_config(tmp_path):
    with pytest.raises(nx.CheckpointError, match="no config.json"):
        _load(tmp_path)


def test_directory_without_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(nx.CheckpointError, match="no weights"):
        _load(ckpt)


def test_corrupt_config(ckpt):
    (ckpt / "config.json").write_text("{not json")
    with pytest.raises(nx.CheckpointError, match="not valid JSON"):
        _load(ckpt)


def test_truncated_safetensors(ckpt):
    f = ckpt / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    with pytest.raises(nx.CheckpointError, match="corrupt or truncated"):
        _load(ckpt)


def test_missing_shard(saved_case, tmp_path):
    _, path = saved_case(GPT2, "sharded")
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    shard = sorted(tmp_path.glob("model-*.safetensors"))[0]
    shard.unlink()
    with pytest.raises(nx.CheckpointError, match=f"shard '{shard.name}'.*missing"):
        _load(tmp_path)


def test_unexpected_keys(ckpt):
    from safetensors.torch import load_file, save_file

    state = load_file(ckpt / "model.safetensors")
    state["transformer.h.0.attn.extra_adapter.weight"] = torch.zeros(2, 2)
    save_file(state, ckpt / "model.safetensors")
    with pytest.raises(nx.WeightKeyError, match="unexpected.*extra_adapter"):
        _load(ckpt)


def test_shape_mismatch(ckpt):
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["vocab_size"] = 300
    (ckpt / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(nx.ShapeMismatchError, match=r"embed.w should have shape \(300, 64\).*\(256, 64\)"):
        _load(ckpt)


def test_pickle_with_code_is_refused(ckpt):
    """A pytorch_model.bin carrying arbitrary objects is never unpickled unsafely."""
    (ckpt / "model.safetensors").unlink()
    torch.save({"transformer.wte.weight": torch.zeros(2), "payload": Exploit()}, ckpt / "pytorch_model.bin")
    with pytest.raises(nx.CheckpointError, match="weights_only"):
        _load(ckpt)
    assert not Exploit.ran


class Exploit:
    ran = False

    def __reduce__(self):
        return (Exploit._run, ())

    @staticmethod
    def _run():
        Exploit.ran = True
        return "pwned"


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(n_positions=0), "n_positions must be a positive int"),
        (dict(n_positions=[64], context_length_estimate=128), "exceeds the largest n_positions"),
        (dict(batch_size=0), "batch_size must be a positive int"),
        (dict(amp="fp8"), "amp must be one of"),
        (dict(backend="tpu-v9"), "backend 'tpu-v9' is not available"),
    ],
)
def test_bad_load_options(ckpt, kw, match):
    with pytest.raises(nx.ConfigError, match=match):
        _load(ckpt, **kw)


def test_prompt_longer_than_largest_bucket(small_model):
    """Prompts beyond the largest prompt bucket are chunked; beyond n_positions they cannot fit."""
    with pytest.raises(nx.BucketError, match=r"prompt of 65 tokens.*largest n_positions bucket 64.*larger n_positions"):
        small_model.generate(torch.ones(2, 65, dtype=torch.long), max_new_tokens=2)


def test_max_new_tokens_beyond_n_positions(small_model):
    with pytest.raises(nx.BucketError, match=r"needs 70 positions.*largest n_positions bucket is 64"):
        small_model.generate(torch.ones(2, 10, dtype=torch.long), max_new_tokens=60)


def test_batch_size_mismatch(small_model):
    with pytest.raises(nx.InputError, match=r"batch of 3 prompt\(s\).*batch_size=2"):
        small_model.generate(torch.ones(3, 4, dtype=torch.long), max_new_tokens=2)


@pytest.mark.parametrize(
    "ids, mask, match",
    [
        ([[5, 6, 7], [5, 6, 0]], [[1, 1, 1], [1, 1, 0]], "not left-padded"),
        ([[5, 6, 7], [0, 0, 0]], [[1, 1, 1], [0, 0, 0]], "all zeros"),
        ([[5, 6, 7], [5, 6, 999]], None, "token id 999 is outside the vocabulary"),
        ([[], []], None, "input_ids is empty"),
        ([[0.5, 1.0], [1.0, 2.0]], None, "integer token ids"),
    ],
)
def test_bad_generate_inputs(small_model, ids, mask, match):
    with pytest.raises(nx.InputError, match=match):
        small_model.generate(ids, attention_mask=mask, max_new_tokens=2)


def test_bad_max_new_tokens(small_model):
    with pytest.raises(nx.InputError, match="max_new_tokens must be a positive int"):
        small_model.generate([[1, 2], [3, 4]], max_new_tokens=0)


def test_unsupported_generate_option_is_named(small_model):
    """An HF-only option such as num_beams gets an NxError naming it and the adapter, not a TypeError."""
    ids = torch.ones(2, 4, dtype=torch.long)
    with pytest.raises(nx.InputError, match=r"does not take num_beams.*HuggingFaceGenerationModelAdapter"):
        small_model.generate(ids, max_new_tokens=2, num_beams=4)
    with pytest.raises(nx.InputError, match=r"stream\(\) does not take no_repeat_ngram_size") as err:
        next(small_model.stream(ids, max_new_tokens=2, no_repeat_ngram_size=3))
    assert "streamer" not in str(err.value)  # generate's own options are not offered for stream
