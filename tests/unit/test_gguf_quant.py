"""GGUF quantized blocks decoded straight into nx's grouped layouts (`nx.gguf_quant`): every block
type dequantizes to exactly what the `gguf` package's reference dequantizer gives, and a tiny llama
written as Q4_0 / Q4_1 loads quantized (``quant="gguf"``, or by default when f32 would not fit) and writes the same greedy tokens as the same
file dequantized to f32 (``quant="f32"``), also under tensor parallelism."""

from __future__ import annotations

import logging

import gguf
import jax
import numpy as np
import pytest
from gguf.quants import dequantize as gguf_dequantize

import nx
from benchmarks.gguf_quant import write_llama_gguf
from nx.gguf_quant import LAYOUTS, decode, dequantize
from nx.quant import QuantizedArray, quantized_names
from tests.cases.llama import CASES
from tests.conftest import GROUPED_TIE, assert_greedy_up_to_ties, left_padded

OPTS = dict(n_positions=[64], context_length_estimate=[16], batch_size=2, progress=False)


def _random_blocks(kind: str, rows: int, blocks: int, seed: int) -> np.ndarray:
    """Random bytes for `blocks` blocks per row, with every f16 field a finite, sensible value."""
    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[kind]]
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (rows, blocks, size), dtype=np.uint8)
    f16 = {"Q8_0": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q4_K": [0, 2], "Q6_K": [size - 2]}[kind]
    for at in f16:
        vals = rng.uniform(-0.1, 0.1, (rows, blocks)).astype(np.float16)
        raw[..., at : at + 2] = vals.view(np.uint8).reshape(rows, blocks, 2)
    return raw.reshape(rows, -1), block


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_fast_dequantize_is_the_gguf_reference_bit_for_bit(kind):
    """`dequantize` (the f32 load path) for the 32-value block types; None for the others."""
    raw, _ = _random_blocks(kind, rows=5, blocks=7, seed=3 * len(kind))
    got = dequantize(raw, kind)
    if kind not in ("Q8_0", "Q4_0", "Q4_1"):
        assert got is None
        return
    ref = gguf_dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(-1)
    assert got.dtype == np.float32 and got.shape == ref.shape
    np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("kind", sorted(LAYOUTS))
def test_decoding_matches_the_gguf_reference(kind):
    raw, block = _random_blocks(kind, rows=6, blocks=3, seed=len(kind))
    shape = (6, 3 * block)
    got = decode(raw, kind, shape)
    bits, group = LAYOUTS[kind]
    assert isinstance(got, QuantizedArray) and (got.bits, got.group_size) == (bits, group)
    assert got.shape == shape and got.scale.shape == (6, 3 * block // group)
    assert (got.zero is not None) == (kind in ("Q4_1", "Q4_K"))
    # a block's own f16 scale stays f16 (the decoded tensor takes the file's bytes); K-quants' are products
    assert got.scale.dtype == (np.float16 if kind in ("Q8_0", "Q4_0", "Q4_1") else np.float32)
    ref = gguf_dequantize(raw, gguf.GGMLQuantizationType[kind]).reshape(shape)
    np.testing.assert_array_equal(got.dequantize(), ref)  # bit for bit
    # rows stay rows: a row permutation of the blocks is the same permutation of the decoded rows
    perm = np.array([3, 1, 5, 0, 2, 4])
    np.testing.assert_array_equal(decode(raw[perm], kind, shape).dequantize(), ref[perm])


def test_quantized_encoders_round_trip_through_decode():
    """gguf's own quantizers (Q8_0, Q4_0, Q4_1) -> nx layout: equal to their dequantization."""
    w = np.random.default_rng(0).standard_normal((5, 96)).astype(np.float32)
    for kind in ("Q8_0", "Q4_0", "Q4_1"):
        t = gguf.GGMLQuantizationType[kind]
        raw = gguf.quants.quantize(w, t)
        np.testing.assert_array_equal(decode(raw, kind, w.shape).dequantize(), gguf_dequantize(raw, t).reshape(w.shape))


def _hf_tensors(hf) -> dict:
    return {k: v.detach().float().numpy() for k, v in hf.state_dict().items() if "rotary" not in k}


@pytest.fixture(scope="module")
def tiny_gguf(saved_case, tmp_path_factory):
    hf, _ = saved_case(CASES[0])
    d = tmp_path_factory.mktemp("gguf")
    files = {}
    for kind in ("Q4_0", "Q4_1"):
        files[kind] = str(d / f"tiny-{kind}.gguf")
        write_llama_gguf(files[kind], hf.config.to_dict(), _hf_tensors(hf), kind, "Q8_0")
    return files


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1"])
def test_gguf_loads_quantized_with_the_dequantized_tokens(tiny_gguf, kind, caplog, tmp_path):
    path = tiny_gguf[kind]
    with caplog.at_level(logging.INFO, logger="nx"):
        default = nx.load(path, **OPTS)
    assert not quantized_names(default.params) and "quant='gguf' keeps them quantized" in caplog.text
    with caplog.at_level(logging.INFO, logger="nx"):
        f32 = sum(a.nbytes for a in jax.tree.leaves(default.params))  # f32 weights would not fit: the blocks stay
        tight = nx.load(path, device_memory=default.kv.nbytes() + int(0.6 * f32), **OPTS)
    assert tight.quant == nx.QuantizationConfig("s4", group_size=32)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="nx"):
        q = nx.load(path, quant="gguf", **OPTS)
    assert f"GGUF holds {kind} weights: loading them as s4 (group 32), Q8_0 as s8 (group 32)" in caplog.text
    assert "quant='f32'" in caplog.text
    assert q.quant == nx.QuantizationConfig("s4", group_size=32)
    qkv, emb = q.params["layers"][0]["qkv"]["w"], q.params["embed"]["w"]
    assert (qkv.bits, qkv.group_size, qkv.zero is not None) == (4, 32, kind == "Q4_1")
    assert (emb.bits, emb.group_size) == (8, 32) and "lm_head.w" in quantized_names(q.params)
    ref = nx.load(path, quant="f32", **OPTS)  # gguf's dequantizer, the model in f32
    assert not quantized_names(ref.params)
    ids, mask = left_padded([9, 5], CASES[0].vocab, seed=3)
    a = ref.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]).numpy()
    b = q.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]).numpy()
    assert len(set(a[:, ids.shape[1]:].ravel().tolist())) >= 4  # not degenerate
    # the blocks' activations are rounded to int8 per 32 inputs (~8 bits): near-ties may flip
    forced = ref.forced_logits(ids, a[:, ids.shape[1] : -1], mask)
    assert_greedy_up_to_ties(a, b, ids.shape[1], forced, GROUPED_TIE)
    # q/k rows un-permuted alike in values and scales: the dequantized weights are the f32 model's
    np.testing.assert_allclose(np.asarray(qkv.dequantize()), np.asarray(ref.params["layers"][0]["qkv"]["w"]), rtol=1e-6)
    if kind == "Q4_1":  # tensor parallelism splits the groups of row-parallel weights; artifacts keep them
        two = nx.load(path, tp_degree=2, quant="gguf", **OPTS)
        c = two.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]).numpy()
        assert_greedy_up_to_ties(a, c, ids.shape[1], forced, GROUPED_TIE)
        q.save(tmp_path / "art")
        back = nx.load(tmp_path / "art")
        w = back.params["layers"][0]["qkv"]["w"]
        assert (w.bits, w.group_size, w.scale.dtype, w.zero.dtype) == (4, 32, np.float16, np.float16)
        np.testing.assert_array_equal(back.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[]).numpy(), b)  # the same model


def test_reads_own_aligned_memory(tiny_gguf):
    """Decoded tensors share no memory with the file and start on 64-byte boundaries (the CPU
    backend then places them without a copy); q/k un-permuted rows too."""
    from nx.checkpoint import open_checkpoint
    from nx.gguf_quant import keep_quantized

    ckpt = open_checkpoint(tiny_gguf["Q4_1"])
    assert keep_quantized(ckpt) == nx.QuantizationConfig("s4", group_size=32)
    for name in ("blk.0.attn_q.weight", "token_embd.weight", "blk.1.ffn_down.weight"):
        a = ckpt.tensors[name]
        assert isinstance(a, QuantizedArray)
        for part in (a.q, a.scale, a.zero):
            if part is not None:
                assert part.ctypes.data % 64 == 0 and part.flags.c_contiguous
    norm = ckpt.tensors["blk.0.attn_norm.weight"]
    assert isinstance(norm, np.ndarray) and norm.dtype == np.float32  # F32 tensors read as before
