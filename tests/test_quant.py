"""int8 weight storage: the host quantizer, the in-graph dequantizing ops, and int8 models on tiny
checkpoints (against the same model in f32), including tensor parallelism."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import nx
from nx import ops
from nx.ops import quant as qops
from nx.ops.quant import QuantizedWeight
from nx.quant import QuantizationConfig, dequantize, nbytes, quantize, quantize_params, quantized_names
from tests.cases.gpt2 import CASES as GPT2_CASES
from tests.cases.llama import CASES
from tests.conftest import left_padded

CASE = CASES[0]


def _weights(seed: int, shape: tuple[int, int]) -> np.ndarray:
    """Channels with very different magnitudes, an outlier, and an all-zero channel."""
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(1e-3, 5.0, shape[1]).astype(np.float32)
    w[3, 1] = 40.0
    w[:, 2] = 0.0
    return w


@pytest.mark.parametrize("axis", [-1, 0])
def test_round_trip_error_is_at_most_half_a_step_per_channel(axis):
    w = _weights(0, (96, 40))
    if axis == 0:
        w = np.ascontiguousarray(w.T)
    q, scale = quantize(w, axis)
    assert q.dtype == np.int8 and q.shape == w.shape
    assert scale.dtype == np.float32 and scale.shape == (w.shape[axis],)
    err = np.abs(dequantize(q, scale, axis) - w)
    per_channel = err.max(axis=1 - axis % 2)
    assert (per_channel <= scale / 2 * (1 + 1e-6) + 1e-12).all()
    # symmetric, full range used: every non-zero channel reaches +-127 at its largest magnitude
    amax = np.abs(q).max(axis=1 - axis % 2)
    assert (amax[scale > 0] == 127).all()
    assert scale[2] == 0 and not q.take(2, axis=axis).any()  # the all-zero channel stays zero


def test_config_validates_and_matches_patterns():
    with pytest.raises(nx.ConfigError, match="quant_dtype"):
        QuantizationConfig(quant_dtype="s4")
    with pytest.raises(nx.ConfigError, match="dequant_dtype"):
        QuantizationConfig(dequant_dtype="f64")
    c = QuantizationConfig(no_quantize=("lm_head.w", "layers.0.*", "down.w"))
    assert c.skips("lm_head.w") and c.skips("layers.0.qkv.w") and c.skips("layers.7.down.w")
    assert not c.skips("layers.1.qkv.w") and not c.skips("embed.w")
    assert QuantizationConfig.from_dict(c.to_dict()) == c


def test_quantize_params_keeps_norms_and_biases_float():
    rng = np.random.default_rng(1)
    tree = {
        "embed": {"w": rng.standard_normal((50, 8)).astype(np.float32)},
        "final_norm": {"w": np.ones(8, np.float32)},
        "layers": [
            {"qkv": {"w": rng.standard_normal((8, 24)).astype(np.float32), "b": np.zeros(24, np.float32)},
             "attn_norm": {"w": np.ones(8, np.float32), "b": np.zeros(8, np.float32)}},
            {"qkv": {"w": rng.standard_normal((8, 24)).astype(np.float32), "b": np.zeros(24, np.float32)},
             "attn_norm": {"w": np.ones(8, np.float32), "b": np.zeros(8, np.float32)}},
        ],
    }
    out = quantize_params(tree, QuantizationConfig(no_quantize=("layers.1.*",)), amp="bf16")
    assert quantized_names(out) == ["embed.w", "layers.0.qkv.w"]
    emb = out["embed"]["w"]
    assert emb.axis == 0 and emb.scale.shape == (50,) and emb.dequant_dtype == "bf16"
    assert out["layers"][0]["qkv"]["w"].scale.shape == (24,)
    assert out["layers"][0]["qkv"]["b"] is tree["layers"][0]["qkv"]["b"]
    assert out["layers"][0]["attn_norm"]["w"].dtype == np.float32
    assert isinstance(out["layers"][1]["qkv"]["w"], np.ndarray)  # excluded by pattern
    assert not isinstance(tree["embed"]["w"], QuantizedWeight)  # input untouched


@pytest.mark.parametrize("tile", [0, 64])  # 0: one conversion; 64: the blocked loops
def test_ops_dequantize_inside_the_program(monkeypatch, tile):
    monkeypatch.setattr(qops, "TILE", tile)
    monkeypatch.setattr(qops, "TILE_PREFILL", tile)
    rng = np.random.default_rng(2)
    w = rng.standard_normal((48, 40)).astype(np.float32)
    table = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((2, 3, 48)).astype(np.float32)
    qw = QuantizedWeight(*quantize(w, -1))
    qt = QuantizedWeight(*quantize(table, 0), axis=0)
    dense_w, dense_t = dequantize(qw.q, qw.scale, -1), dequantize(qt.q, qt.scale, 0)
    b = rng.standard_normal(40).astype(np.float32)
    ids = jnp.asarray([[1, 63, 7]])

    got = jax.jit(lambda x, p: ops.linear(x, p))(x, {"w": qw, "b": b})
    np.testing.assert_allclose(got, x @ dense_w + b, rtol=1e-5, atol=1e-5)
    got = jax.jit(ops.lm_head)(x, qt)
    np.testing.assert_allclose(got, x @ dense_t.T, rtol=1e-5, atol=1e-5)
    got = jax.jit(ops.embed)(ids, qt)
    np.testing.assert_allclose(got, dense_t[np.asarray(ids)], rtol=1e-6)
    assert qw.dequantize().dtype == jnp.float32 and np.allclose(qw.dequantize(), dense_w)


def test_blocking_picks_divisors_within_the_tile(monkeypatch):
    monkeypatch.setattr(qops, "TILE", 1000)
    nb = qops._n_blocks(576, 100)
    assert 576 % nb == 0 and 576 // nb * 100 <= 1000
    assert qops._n_blocks(7, 3) == 1  # small enough: no loop


@pytest.fixture(scope="module")
def tiny(saved_case):
    _, path = saved_case(CASE)
    opts = dict(n_positions=[64], context_length_estimate=[16], batch_size=2, progress=False)
    return nx.load("llama", path, **opts), nx.load("llama", path, quant="s8", **opts)


def test_int8_model_is_close_to_f32_and_4x_smaller(tiny):
    f32, q = tiny
    ids, mask = left_padded([9, 5], CASE.vocab, seed=4)
    a, b = f32.logits(ids, mask), q.logits(ids, mask)
    # int8 steps are ~0.4% of each channel's range; through 2 layers of a random model the logits
    # move by a few percent of their range (greedy agreement is measured on SmolLM2, not here)
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()
    assert np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.999
    # every 2-D weight is int8; the tiny model's norms keep the ratio a bit above 1/4
    leaves = jax.tree.leaves(q.params)
    assert {str(x.dtype) for x in leaves} == {"int8", "float32"}
    assert nbytes(q.params) <= 0.3 * nbytes(f32.params)
    assert isinstance(q.params["embed"]["w"], QuantizedWeight)


def test_forced_logits_follow_the_fed_tokens(tiny):
    f32, _ = tiny
    ids, mask = left_padded([6, 6], CASE.vocab, seed=5)
    out = f32.generate(ids, max_new_tokens=6, eos_token_id=[]).numpy()
    new = out[:, ids.shape[1]:]
    forced = f32.forced_logits(ids, new[:, :-1])
    assert forced.shape == (2, 6, CASE.vocab)
    assert (forced.argmax(-1) == new).all()  # greedy is argmax of the same logits, step by step
    np.testing.assert_allclose(forced[:, 0], f32.logits(ids), rtol=1e-5, atol=1e-5)
    with pytest.raises(nx.BucketError):
        f32.forced_logits(ids, np.zeros((2, 64), np.int64))


@pytest.mark.parametrize("case", [GPT2_CASES[0]], ids=str)
def test_learned_positions_and_bf16_dequant(saved_case, case):
    """GPT-2 quantizes its position table too (read through nx.ops.embed); dequant to bf16 works."""
    hf, path = saved_case(case)
    opts = dict(n_positions=[32], context_length_estimate=[16], progress=False)
    f32 = nx.load(case.family, path, **opts)
    q = nx.load(case.family, path, quant=QuantizationConfig(dequant_dtype="bf16"), **opts)
    assert "pos.w" in quantized_names(q.params)
    ids, _ = left_padded([7], case.vocab, seed=6)
    a, b = f32.logits(ids), q.logits(ids)
    assert np.abs(a - b).max() <= 0.05 * np.abs(a).max()


def test_quantized_weights_shard_with_their_columns():
    """tp=2 int8 against tp=1 int8 in a fresh process with two CPU devices: same logits; each
    shard's scale slice follows its columns (column/vocab-parallel) or is replicated (row)."""
    script = textwrap.dedent(
        f"""
        import json, sys, tempfile
        import numpy as np
        sys.path.insert(0, {os.getcwd()!r})
        import nx
        from tests.cases.llama import CASES
        from tests.conftest import left_padded
        case = CASES[0]
        d = tempfile.mkdtemp()
        case.build().save_pretrained(d)
        opts = dict(n_positions=[32], context_length_estimate=[16], progress=False, quant="s8")
        one = nx.load("llama", d, **opts)
        two = nx.load("llama", d, tp_degree=2, **opts)
        ids, _ = left_padded([9], case.vocab, seed=7)
        a, b = one.logits(ids), two.logits(ids)
        qkv = two.params["layers"][0]["qkv"]["w"]
        o = two.params["layers"][0]["o"]["w"]
        emb = two.params["embed"]["w"]
        shards = lambda arr: [tuple(s.data.shape) for s in arr.addressable_shards]
        print(json.dumps(dict(
            diff=float(np.abs(a - b).max()), scale=float(np.abs(a).max()),
            same_tokens=bool((a.argmax(-1) == b.argmax(-1)).all()),
            qkv_q=shards(qkv.q), qkv_scale=shards(qkv.scale), o_q=shards(o.q), o_scale=shards(o.scale),
            emb_q=shards(emb.q), emb_scale=shards(emb.scale),
        )))
        """
    )
    env = dict(os.environ, JAX_NUM_CPU_DEVICES="2", JAX_PLATFORMS="cpu")
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["diff"] <= 1e-4 * r["scale"] and r["same_tokens"]
    (q0, q1), (s0, s1) = r["qkv_q"], r["qkv_scale"]
    assert q0 == q1 and s0 == s1 and s0[0] == q0[1]  # column-parallel: scale split with the columns
    (o0, _), (os0, os1) = r["o_q"], r["o_scale"]
    assert o0 == [32, 64] and os0 == os1 == [64]  # row-parallel: q split by input rows, scale replicated
    (e0, _), (es0, _) = r["emb_q"], r["emb_scale"]
    assert e0 == [128, 64] and es0 == [128]  # vocab-parallel: scale rows follow the table rows
