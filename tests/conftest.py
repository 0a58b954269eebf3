"""Shared fixtures: tiny HF checkpoints on disk and HF reference generation."""

from __future__ import annotations

import inspect
import os
import shutil
import tempfile

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Four host devices for the tensor-parallel tests; must be set before jax starts.
os.environ.setdefault("JAX_NUM_CPU_DEVICES", "4")
# Compiled programs go to a cache of this session's own, never the user's (~/.cache/nx); tests
# that load the same tiny model again then run on programs from it, as users' second loads do.
os.environ["NX_CACHE_DIR"] = tempfile.mkdtemp(prefix="nx-test-compile-cache-")

import numpy as np
import pytest
import torch

from tests.cases import Case


@pytest.fixture(scope="session", autouse=True)
def _remove_test_compile_cache():
    path = os.environ["NX_CACHE_DIR"]
    yield
    shutil.rmtree(path, ignore_errors=True)


def hf_greedy(model, ids: torch.Tensor, mask: torch.Tensor, new: int) -> torch.Tensor:
    """Hugging Face's own greedy generate (no EOS stop) on left-padded prompts."""
    with torch.no_grad():
        return model.generate(
            ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
            pad_token_id=0, eos_token_id=None,
        )


def hf_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """HF logits of every position ``[batch, length, vocab]``, positions counted from each row's
    first real token."""
    with torch.no_grad():
        kwargs = {"attention_mask": mask}
        if "position_ids" in inspect.signature(model.forward).parameters:
            kwargs["position_ids"] = (mask.cumsum(-1) - 1).clamp(min=0)
        return model(ids, **kwargs).logits.float().numpy()


def hf_last_logits(model, ids: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
    """HF logits of the last prompt token, positions counted from each row's first real token."""
    return hf_logits(model, ids, mask)[:, -1]


#: `assert_greedy_up_to_ties`' near-tie for grouped weights: the largest flip measured in the tiny
#: models of tests/conformance/test_quant_groups.py and tests/unit/test_gguf_quant.py was 0.034 of
#: the logit spread (2026-12-05), so 0.05.
GROUPED_TIE = 0.05
LOGIT_RTOL = 1e-4  # |nx - hf| <= LOGIT_RTOL * max(1, max|hf|): f32 summed in another order


def assert_same_greedy(hf, model, ids: torch.Tensor, mask: torch.Tensor, new: int, tie: float | None = None) -> None:
    """nx's greedy tokens equal HF's, and the tiny model is not degenerate (a row repeating one token
    would make the comparison weak). With `tie`, a row may part from HF's at a near-tie in HF's
    logits (`assert_greedy_up_to_ties`)."""
    ref = hf_greedy(hf, ids, mask, new)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new, eos_token_id=[])
    assert out.dtype == torch.long and out.shape == ref.shape
    gen = ref[:, ids.shape[1] :]
    degenerate = any(len(set(row.tolist())) < 2 for row in gen) or len(set(gen.flatten().tolist())) < 4
    assert not degenerate, f"degenerate tiny model (a row repeats one token): {gen.tolist()}"
    if tie is not None:
        full = torch.cat([mask, torch.ones(mask.shape[0], new, dtype=mask.dtype)], dim=1)
        logits = hf_logits(hf, ref, full)[:, ids.shape[1] - 1 : -1]
        return assert_greedy_up_to_ties(ref.numpy(), out.numpy(), ids.shape[1], logits, tie)
    mismatch = (out != ref).nonzero()
    assert mismatch.numel() == 0, f"first mismatch at {mismatch[0].tolist()}:\nnx={out.tolist()}\nhf={ref.tolist()}"


def assert_greedy_up_to_ties(ref: np.ndarray, out: np.ndarray, prompt: int, ref_logits: np.ndarray, tie: float) -> None:
    """Greedy tokens ``out`` equal the reference's ``ref`` (``[batch, prompt + new]``), except that a
    row may first differ where ``out``'s token is a near-tie in the reference's logits before that
    step (``ref_logits [batch, new, vocab]``, teacher-forced along ``ref``): below the top logit by
    at most `tie` times their spread. For grouped weights, whose activations nx rounds to int8 per
    block of 32 inputs (~8 bits, as llama.cpp does); after such a step the rows are not compared."""
    ref, out = np.asarray(ref), np.asarray(out)
    assert out.shape == ref.shape
    for r in range(ref.shape[0]):
        diff = np.flatnonzero(out[r] != ref[r])
        if diff.size == 0:
            continue
        p = int(diff[0])
        assert p >= prompt, f"row {r}: the prompt changed at {p}"
        logits = np.asarray(ref_logits[r, p - prompt], np.float64)
        gap, spread = logits[ref[r, p]] - logits[out[r, p]], logits.max() - logits.min()
        assert gap <= tie * spread, f"row {r}, step {p}: nx's token trails the reference's by {gap:.4g} (spread {spread:.4g})"


def assert_close_logits(hf, model, ids: torch.Tensor, mask: torch.Tensor) -> None:
    """nx's last-prompt-token logits within LOGIT_RTOL of HF's."""
    ref = hf_last_logits(hf, ids, mask)
    got = model.logits(ids, mask)
    np.testing.assert_allclose(got, ref, rtol=0, atol=LOGIT_RTOL * max(1.0, float(np.abs(ref).max())))


def left_padded(lengths: list[int], vocab: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random prompts of the given lengths, left-padded with id 0 to the longest."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, n in enumerate(lengths):
        ids[r, width - n :] = torch.randint(3, vocab, (n,), generator=g)
        mask[r, width - n :] = 1
    return ids, mask


@pytest.fixture(scope="session")
def saved_case(tmp_path_factory):
    """`saved_case(case, fmt)` -> (hf_model, checkpoint dir); each written once per session."""
    cache: dict[tuple[str, str], tuple[object, str]] = {}
    models: dict[str, object] = {}

    def get(case: Case, fmt: str = "safetensors"):
        key = (case.id, fmt)
        if key not in cache:
            model = models.setdefault(case.id, case.build())
            d = tmp_path_factory.mktemp(f"{case.id}-{fmt}")
            if fmt == "safetensors":
                model.save_pretrained(d)
            elif fmt == "sharded":
                model.save_pretrained(d, max_shard_size="20KB")
            elif fmt == "bin":
                model.save_pretrained(d, safe_serialization=False)
            else:
                raise ValueError(fmt)
            cache[key] = (model, str(d))
        return cache[key]

    return get


@pytest.fixture(scope="session")
def llama_chat_ckpt(saved_case, tmp_path_factory) -> str:
    """The first tiny llama case with `char_tokenizer` saved beside it (CLI and artifact tests)."""
    import shutil

    from tests.cases.llama import CASES

    _, path = saved_case(CASES[0])
    d = tmp_path_factory.mktemp("llama-chat")
    shutil.copytree(path, d, dirs_exist_ok=True)
    char_tokenizer().save_pretrained(d)
    return str(d)


def char_tokenizer():
    """A tiny character-level HF tokenizer (ids < 100) with a chat template, built offline."""
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2}
    for i in range(32, 127):
        vocab[chr(i)] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tk.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>")
    fast.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    return fast


@pytest.fixture
def editable_gpt2(saved_case, tmp_path):
    """A private, editable copy of the first tiny gpt2 checkpoint (tests that damage files)."""
    from tests.cases.gpt2 import CASES

    _, path = saved_case(CASES[0])
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    return tmp_path


def assert_kernel_matches_xla(path, load: dict, batch: int, vocab: int, levels: list[str], monkeypatch,
                              rtol: float) -> None:
    """Greedy tokens (12, EOS off) and prompt logits of ``nx.load("llama", path, **load)`` with the CPU
    kernels forced to each of `levels` equal those with ``NX_CPU_KERNELS=off`` (logits to `rtol` of
    their largest magnitude): the kernels against the pure-XLA path, one whole model at a time."""
    import nx
    from nx.ops import cpu_kernels

    ids, mask = left_padded([9, 5][:batch], vocab, seed=11)

    def greedy():
        model = nx.load("llama", path, **load)
        return model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]).numpy(), model.logits(ids, mask)

    for level in levels:
        monkeypatch.setenv(cpu_kernels.ENV, level)
        tokens, logits = greedy()
        monkeypatch.setenv(cpu_kernels.ENV, "off")
        ref_tokens, ref_logits = greedy()
        np.testing.assert_array_equal(tokens, ref_tokens)
        np.testing.assert_allclose(logits, ref_logits, rtol=rtol, atol=rtol * np.abs(ref_logits).max())
