"""int8 weight storage: the host quantizer, the in-graph dequantizing ops, and int8 models on tiny
checkpoints (against the same model in f32), including tensor parallelism."""

from __future__ import annotations

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
        QuantizationConfig(quant_dtype="s3")
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
            {"qkv": {"w": rng.standard_normal((24, 8)).astype(np.float32), "b": np.zeros(24, np.float32)},
             "attn_norm": {"w": np.ones(8, np.float32), "b": np.zeros(8, np.float32)}},
            {"qkv": {"w": rng.standard_normal((24, 8)).astype(np.float32), "b": np.zeros(24, np.float32)},
             "attn_norm": {"w": np.ones(8, np.float32), "b": np.zeros(8, np.float32)}},
        ],
    }
    out = quantize_params(tree, QuantizationConfig(no_quantize=("layers.1.*",)), amp="bf16")
    assert quantized_names(out) == ["embed.w", "layers.0.qkv.w"]
    emb = out["embed"]["w"]
    assert emb.scale.shape == (50,) and emb.dequant_dtype == "bf16" and emb.dtype == "bf16"
    assert out["layers"][0]["qkv"]["w"].scale.shape == (24,)
    assert out["layers"][0]["qkv"]["b"] is tree["layers"][0]["qkv"]["b"]
    assert out["layers"][0]["attn_norm"]["w"].dtype == np.float32
    assert isinstance(out["layers"][1]["qkv"]["w"], np.ndarray)  # excluded by pattern
    assert not isinstance(tree["embed"]["w"], QuantizedWeight)  # input untouched


@pytest.mark.parametrize("int8_dot", [True, False])  # the CPU formulation; the accelerators' conversion
def test_ops_multiply_int8_weights_inside_the_program(int8_dot):
    rng = np.random.default_rng(2)
    w = rng.standard_normal((40, 48)).astype(np.float32)  # [out, in]
    table = rng.standard_normal((64, 48)).astype(np.float32)
    x = rng.standard_normal((2, 3, 48)).astype(np.float32)
    qw = QuantizedWeight(*quantize(w), int8_dot=int8_dot)
    qt = QuantizedWeight(*quantize(table), int8_dot=int8_dot)
    dense_w, dense_t = dequantize(qw.q, qw.scale), dequantize(qt.q, qt.scale)
    b = rng.standard_normal(40).astype(np.float32)
    ids = jnp.asarray([[1, 63, 7]])

    def bound(dense):
        """int8 terms carry each activation within max|row| / 254**2 (see `test_int8_terms`), so an
        output moves by at most that times the weight row's L1 norm; the f32 path is exact."""
        rows = np.abs(x).max(-1, keepdims=True) / 254**2
        return rows * np.abs(dense).sum(1) * 1.01 + 1e-5 if int8_dot else 1e-5

    got = jax.jit(lambda x, p: ops.linear(x, p))(x, {"w": qw, "b": b})
    ref = x @ dense_w.T + b
    assert (np.abs(got - ref) <= bound(dense_w) + 1e-5 * np.abs(ref)).all()
    got = jax.jit(ops.lm_head)(x, qt)
    ref = x @ dense_t.T
    assert (np.abs(got - ref) <= bound(dense_t) + 1e-5 * np.abs(ref)).all()
    got = jax.jit(ops.embed)(ids, qt)
    np.testing.assert_allclose(got, dense_t[np.asarray(ids)], rtol=1e-6)
    assert qw.dequantize().dtype == jnp.float32 and np.allclose(qw.dequantize(), dense_w)
    # looked-up rows come out in the model's activation dtype, whatever the matmul dtype
    mixed = QuantizedWeight(qt.q, qt.scale, "bf16", "f32", int8_dot)
    assert jax.jit(ops.embed)(ids, mixed).dtype == jnp.float32
    assert jax.jit(lambda x: ops.lm_head(x, mixed))(x).dtype == jnp.float32


def test_int8_terms():
    """Two int8 terms per row reconstruct it within max|row| / 254**2; zero rows stay zero."""
    rng = np.random.default_rng(8)
    x = rng.standard_normal((5, 300)).astype(np.float32) * np.float32([[1e-3], [1], [30], [0], [1e4]])
    x[2, 7] = 900.0  # an outlier sets its row's scale
    terms, scales = jax.jit(qops.int8_terms)(jnp.asarray(x))
    terms, scales = np.asarray(terms), np.asarray(scales)
    assert terms.dtype == np.int8 and terms.shape == (10, 300) and scales.shape == (10, 1)
    hi, lo = terms[:5].astype(np.float32) * scales[:5], terms[5:].astype(np.float32) * scales[5:]
    err = np.abs(hi + lo - x)
    amax = np.abs(x).max(-1)
    assert (err.max(-1) <= amax / 254**2 * 1.01).all()
    assert (np.abs(terms[:5]).max(-1)[amax > 0] == 127).all()  # the full int8 range is used
    assert not terms[3].any() and not terms[8].any() and not (hi + lo)[3].any()
    one, _ = qops.int8_terms(jnp.ones((1, 8)))
    assert one.shape == (2, 8)  # one token gives two rows: XLA:CPU's int8 matrix-vector path is slow


def test_int8_dots_only_for_the_cpu_backend(monkeypatch):
    monkeypatch.setenv("NX_CPU_KERNELS", "off")  # the XLA formulation (the kernel's: test_cpu_kernels.py)
    tree = {"layers": [], "up": {"w": np.random.default_rng(3).standard_normal((16, 32)).astype(np.float32)}}
    x = jnp.asarray(np.random.default_rng(4).standard_normal((1, 32)).astype(np.float32))
    cpu = quantize_params(tree, QuantizationConfig(), backend="cpu")["up"]
    gpu = quantize_params(tree, QuantizationConfig(), backend="cuda")["up"]
    assert cpu["w"].int8_dot and not gpu["w"].int8_dot

    def hlo(p):
        return jax.jit(ops.linear).lower(x, p).as_text()

    # CPU: int8 x int8 -> int32; accelerators convert the weight and XLA fuses that into the dot
    assert "-> tensor<2x16xi32>" in hlo(cpu) and "i32>" not in hlo(gpu)
    a, b = jax.jit(ops.linear)(x, cpu), jax.jit(ops.linear)(x, gpu)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(b).max()  # the activation terms' ~15 bits


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


def test_quantized_weights_shard_with_their_rows(saved_case):
    """tp=2 int8 against tp=1 int8: same logits; each shard's scale slice follows its columns
    (column/vocab-parallel) or is the whole scale (row-parallel)."""
    _, path = saved_case(CASE)
    opts = dict(n_positions=[32], context_length_estimate=[16], progress=False, quant="s8")
    one = nx.load("llama", path, **opts)
    two = nx.load("llama", path, tp_degree=2, **opts)
    ids, _ = left_padded([9], CASE.vocab, seed=7)
    a, b = one.logits(ids), two.logits(ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max() and (a.argmax(-1) == b.argmax(-1)).all()

    def shards(arr):
        return [tuple(s.data.shape) for s in arr.addressable_shards]

    layer = two.params["layers"][0]
    qkv, o, emb = layer["qkv"]["w"], layer["o"]["w"], two.params["embed"]["w"]
    d = two.spec.qkv_dim // 2  # hidden 64, qkv 128 in the tiny llama
    assert shards(qkv.q) == [(d, 64)] * 2 and shards(qkv.scale) == [(d,)] * 2  # column-parallel: rows split
    assert shards(o.q) == [(64, 32)] * 2 and shards(o.scale) == [(64,)] * 2  # row-parallel: scale whole
    assert shards(emb.q) == [(128, 64)] * 2 and shards(emb.scale) == [(128,)] * 2  # vocab-parallel
    # quantized after the re-layout: the same per-row scales, in the shards' row order
    one_scale = np.asarray(one.params["layers"][0]["qkv"]["w"].scale)
    np.testing.assert_array_equal(np.sort(np.asarray(qkv.scale)), np.sort(one_scale))
