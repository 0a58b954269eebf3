"""Scanned layers (``unroll=k``): the same tokens and logits as Hugging Face and as the fully
unrolled program, with tensor parallelism, int8 weights and saved artifacts too."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import nx
from nx import scan
from nx.ops import cpu_kernels
from tests.cases import all_cases
from tests.conftest import assert_close_logits, assert_same_greedy, hf_greedy, left_padded

BUCKETS = dict(n_positions=[32, 64], context_length_estimate=[8, 16], progress=False)
CASES = all_cases()
DEEP = next(c for c in CASES if c.id == "gpt2-relu-inner")  # 3 layers: unroll 1 and 3 are valid


@pytest.mark.parametrize("case", CASES, ids=str)
def test_scanned_layers_match_hf(case, saved_case):
    """unroll=1 (one layer compiled, looped n_layers times) on a left-padded batch of three."""
    hf, path = saved_case(case)
    model = nx.load(case.family, path, batch_size=3, unroll=1, **BUCKETS)
    assert model.unroll == 1 and len(model.caches) == 1 and model.caches[0][0].shape[0] == model.spec.n_layers
    ids, mask = left_padded([16, 9, 3], case.vocab, seed=3)
    assert_same_greedy(hf, model, ids, mask, 36)
    assert_close_logits(hf, model, ids, mask)


def test_scanned_program_is_a_loop(saved_case, monkeypatch):
    monkeypatch.setenv(cpu_kernels.ENV, "off")  # XLA's dots to count (decode's kernels leave none on the cpu)
    _, path = saved_case(DEEP)
    full = nx.load("gpt2", path, compile=False, **BUCKETS)
    looped = nx.load("gpt2", path, compile=False, unroll=1, **BUCKETS)
    assert "while" not in full.lower(1, 1, 32).as_text()
    text = looped.lower(1, 1, 32).as_text()
    assert "while" in text
    assert text.count("dot_general") < full.lower(1, 1, 32).as_text().count("dot_general")


def test_unroll_equal_to_depth_is_the_unrolled_program(saved_case):
    _, path = saved_case(DEEP)
    assert nx.load("gpt2", path, compile=False, unroll=3, **BUCKETS).unroll is None


@pytest.mark.parametrize("tp", [2, 4])
def test_scanned_layers_with_tensor_parallelism(saved_case, tp):
    case = next(c for c in CASES if c.family == "llama")
    hf, path = saved_case(case)
    model = nx.load("llama", path, batch_size=3, unroll=1, tp_degree=tp, **BUCKETS)
    ids, mask = left_padded([16, 9, 3], case.vocab, seed=5)
    assert torch.equal(model.generate(ids, attention_mask=mask, max_new_tokens=24, eos_token_id=[]),
                       hf_greedy(hf, ids, mask, 24))


def test_scanned_int8_equals_unrolled_int8(saved_case):
    _, path = saved_case(DEEP)
    ids, mask = left_padded([12, 7], DEEP.vocab, seed=1)
    outs, logits = [], []
    for unroll in (None, 1):
        model = nx.load("gpt2", path, batch_size=2, quant="s8", unroll=unroll, **BUCKETS)
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[]))
        logits.append(model.logits(ids, mask))
    assert torch.equal(outs[0], outs[1])
    np.testing.assert_allclose(logits[1], logits[0], rtol=0, atol=1e-4 * np.abs(logits[0]).max())


def test_scanned_artifact_round_trip(saved_case, tmp_path):
    _, path = saved_case(DEEP)
    model = nx.load("gpt2", path, unroll=1, **BUCKETS)
    prompt = [[5, 9, 77, 31, 2, 140]]
    ref = model.generate(prompt, max_new_tokens=16, eos_token_id=[])
    model.save(tmp_path / "art")
    loaded = nx.load(tmp_path / "art")
    assert loaded.unroll == 1 and loaded.config.unroll == 1
    assert torch.equal(loaded.generate(prompt, max_new_tokens=16, eos_token_id=[]), ref)
    with pytest.raises(nx.ConfigError, match="unroll=1"):
        nx.load(tmp_path / "art", unroll=3)


@pytest.mark.parametrize("bad", [2, 0, -1, True, 1.5])
def test_invalid_unroll_is_a_clear_error_before_reading_weights(saved_case, monkeypatch, bad):
    _, path = saved_case(DEEP)
    monkeypatch.setattr("nx.loader.build_params", lambda *a, **k: pytest.fail("weights were read"))
    with pytest.raises(nx.ConfigError, match="unroll"):
        nx.load("gpt2", path, unroll=bad, **BUCKETS)


def test_stack_and_unstack_are_inverse():
    layers = [{"w": np.full((2, 3), i, np.float32), "b": np.full((3,), -i, np.float32)} for i in range(6)]
    blocks = scan.stack(layers, 2)
    assert len(blocks) == 2 and blocks[0]["w"].shape == (3, 2, 3)
    assert [float(b["w"][0, 0, 0]) for b in blocks] == [0.0, 1.0]  # block 0 = layers 0, 1
    back = scan.unstack(blocks)
    assert [float(x["b"][0]) for x in back] == [0, -1, -2, -3, -4, -5]
    assert layers == []  # consumed: the per-layer arrays are not kept next to the stacked ones


def test_stack_holds_one_layer_tensor_extra_not_a_second_model():
    import tracemalloc

    mb = 1 << 20
    model = 12 * 3 * mb
    tracemalloc.start()  # numpy reports its data buffers to tracemalloc (made from here on)
    try:
        layers = [{"w": np.full((mb // 4,), i, np.float32), "u": np.ones((2 * mb // 4,), np.float32)} for i in range(12)]
        base = tracemalloc.get_traced_memory()[0]
        blocks = scan.stack(layers, 3)
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert [float(b["w"][1, 0]) for b in blocks] == [3.0, 4.0, 5.0]  # block 1 = layers 3, 4, 5
    # np.stack would grow by the whole model (the layers stay alive until it returns); consuming
    # them grows by one stacked tensor (here 4 layers x 2 MB) before the layers' copies are freed
    assert peak <= 9 * mb < model, f"stacking grew {peak / mb:.1f} MB over the {model / mb:.0f} MB of layers"


def test_bf16_scanned_equals_bf16_unrolled(saved_case):
    """16-bit programs round where they say they round, whatever their layout: XLA's default excess
    precision made bf16 tokens depend on `unroll` (this model: 48% of greedy tokens equal)."""
    case = next(c for c in CASES if c.id == "llama-gqa")
    _, path = saved_case(case)
    ids, mask = left_padded([16, 9, 3], case.vocab, seed=3)
    outs, logits = [], []
    for unroll in (None, 1):
        model = nx.load("llama", path, batch_size=3, amp="bf16", unroll=unroll, **BUCKETS)
        outs.append(model.generate(ids, attention_mask=mask, max_new_tokens=40, eos_token_id=[]))
        logits.append(np.asarray(model.logits(ids, mask)))
    assert torch.equal(outs[0], outs[1])
    np.testing.assert_array_equal(logits[0], logits[1])
