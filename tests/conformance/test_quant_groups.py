"""Grouped int8 / int4 weights (``quant="s4"``, ``QuantizationConfig(group_size=...)``): the host
quantizer and packing, the in-program matmuls, and every family's greedy tokens against the same
model whose weights are replaced by their dequantized values (run by nx in f32 and by HF)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import nx
from nx import ops
from nx.ops import cpu_kernels
from nx.ops.quant import QuantizedWeight
from nx.quant import (
    QuantizationConfig,
    QuantizedArray,
    dequantize_groups,
    pack4,
    quantize,
    quantize_groups,
    quantized_names,
    unpack4,
)
from tests.cases import all_cases
from tests.cases.llama import CASES as LLAMA
from tests.conftest import GROUPED_TIE, assert_same_greedy, left_padded

FIRST_OF_EACH = list({c.family: c for c in reversed(all_cases())}.values())
OPTS = dict(n_positions=[64], context_length_estimate=[16], batch_size=2, progress=False)


def _weights(seed: int, shape: tuple[int, int]) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal(shape).astype(np.float32) * rng.uniform(1e-3, 5.0, shape[1]).astype(np.float32)
    w[3, 1] = 40.0
    w[5, :64] = 0.0  # an all-zero group
    w[6, 32:64] = np.float32([1.0, -1.0] * 16)  # +m and -m: -m clips to 7 steps
    return w


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("group", [16, 32, 64])
def test_groups_round_trip_within_one_step(bits, group):
    w = _weights(0, (24, 128))
    q, scale = quantize_groups(w, bits, group)
    assert scale.shape == (24, 128 // group) and scale.dtype == np.float16  # as GGUF's blocks
    assert q.dtype == (np.int8 if bits == 8 else np.uint8) and q.shape == (24, 128 * bits // 8)
    back = dequantize_groups(q, scale, bits, group)
    err = np.abs(back - w).reshape(24, -1, group).max(-1)
    s = np.abs(scale.astype(np.float32))
    # one step at most (the clipped +m), else half, plus the f16 rounding of the scale (2**-11 of it,
    # times at most 8 steps to the clipped value)
    assert (err <= s * (1 + 8 * 2.0**-11) + 1e-7).all()
    # the group's value of largest magnitude maps to -2**(bits-1) steps: exact up to the scale's rounding
    g = w.reshape(24, -1, group)
    at = np.abs(g).argmax(-1)[..., None]
    peak = np.take_along_axis(g, at, -1)
    np.testing.assert_allclose(np.take_along_axis(back.reshape(24, -1, group), at, -1), peak, rtol=2.0**-11)
    assert scale[5, 0] == 0 and not back[5, :group].any()


def test_group_scales_stay_f32_outside_f16s_normal_range():
    """A scale f16 would flush toward zero (or overflow) keeps the whole weight's scales in f32."""
    w = _weights(0, (24, 128))
    for tiny_or_huge in (1e-6, 1e6):
        w2 = w.copy()
        w2[2, :32] = tiny_or_huge
        q, scale = quantize_groups(w2, 4, 32)
        assert scale.dtype == np.float32
        np.testing.assert_allclose(dequantize_groups(q, scale, 4, 32)[2, :32], tiny_or_huge, rtol=1e-6)


def test_pack4_is_llama_cpp_order_and_inverts():
    v = np.arange(64, dtype=np.int16).reshape(1, 64) % 16 - 8
    p = pack4(v.astype(np.int8), 32)
    assert p.shape == (1, 32) and p[0, 0] == ((v[0, 0] + 8) | ((v[0, 16] + 8) << 4))
    assert np.array_equal(unpack4(p, 32), v)
    assert np.array_equal(unpack4(pack4(v + 8, 32, signed=False), 32, signed=False), v + 8)


def test_config():
    assert QuantizationConfig("s4").group_size == 32 and QuantizationConfig("s4", group_size=64).group_size == 64
    assert QuantizationConfig().group_size is None and nx.QuantizationConfig("s4").bits == 4
    with pytest.raises(nx.ConfigError, match="group_size"):
        QuantizationConfig("s4", group_size=7)
    c = QuantizationConfig("s4", group_size=64, no_quantize=("lm_head.w",))
    assert QuantizationConfig.from_dict(c.to_dict()) == c


def _grouped(w, bits, group, affine, int8_dot):
    q, scale = quantize_groups(w, bits, group)
    zero = None
    if affine:  # Q4_1-style: unsigned nibbles and a per-group offset
        rng = np.random.default_rng(9)
        zero = rng.standard_normal(scale.shape).astype(np.float32)
        if bits == 4:
            q = pack4(unpack4(q, group) + 8, group, signed=False)
    qw = QuantizedWeight(q, scale, "f32", "f32", int8_dot, zero=zero, bits=bits, group_size=group)
    return qw, dequantize_groups(q, scale, bits, group, zero)


@pytest.mark.parametrize("int8_dot", [True, False])
@pytest.mark.parametrize("bits,affine", [(8, False), (4, False), (4, True)])
@pytest.mark.parametrize("rows", [1, 3, 40])  # decode (group-batched int8 dot) and prefill (dequantized)
def test_grouped_matmul_and_lookup(int8_dot, bits, affine, rows):
    rng = np.random.default_rng(2)
    w = _weights(1, (40, 96))
    qw, dense = _grouped(w, bits, 32, affine, int8_dot)
    assert qw.shape == (40, 96)
    x = rng.standard_normal((rows, 96)).astype(np.float32)
    got = np.asarray(jax.jit(ops.lm_head)(x, qw))
    ref = x @ dense.T
    # int8 dots (CPU): one activation term per block of 32 inputs, each activation within half its
    # block's step, max|block| / 254, of x (the affine offsets meet the exact x)
    step = np.repeat(np.abs(x).reshape(rows, -1, 32).max(-1), 32, axis=1) / 254
    scaled = dense - (0 if qw.zero is None else np.repeat(np.asarray(qw.zero), 32, axis=1))
    bound = step @ np.abs(scaled).T * 1.01 + 1e-4 * np.abs(ref).max()
    assert (np.abs(got - ref) <= bound).all()
    ids = jnp.asarray([[0, 39, 5, 6]])
    np.testing.assert_allclose(jax.jit(ops.embed)(ids, qw), dense[np.asarray(ids)], rtol=1e-6)
    np.testing.assert_allclose(qw.dequantize(), dense, rtol=1e-6)


def test_cpu_decode_is_an_int8_dot_over_groups(monkeypatch):
    """One token on CPU: the unpacked int4 values meet one int8 activation term per block of 32
    inputs in an int8 dot batched over the blocks (no f32 copy of the weight). XLA's path:
    nx-kernels-cpu runs it as one call."""
    monkeypatch.setenv("NX_CPU_KERNELS", "off")
    qw, _ = _grouped(_weights(1, (64, 96)), 4, 32, False, True)
    hlo = jax.jit(ops.lm_head).lower(jnp.ones((1, 96)), qw).as_text()
    assert "-> tensor<3x1x64xi32>" in hlo and "tensor<64x96xf32>" not in hlo


def test_quantized_array_row_operations_stay_quantized():
    w = _weights(3, (8, 64))
    a = QuantizedArray(*quantize_groups(w, 4, 32), 4, 32)
    rows = np.array([3, 0, 7])
    taken = np.take(a, rows, axis=0)
    assert isinstance(taken, QuantizedArray) and np.array_equal(taken.dequantize(), a.dequantize()[rows])
    pad = np.zeros((2, 64), a.dtype)
    joined = np.concatenate([a, taken, pad])
    assert isinstance(joined, QuantizedArray) and joined.shape == (13, 64)
    np.testing.assert_array_equal(joined.dequantize(), np.concatenate([a.dequantize(), taken.dequantize(), pad]))
    affine = QuantizedArray(pack4(unpack4(a.q, 32) + 8, 32, signed=False), a.scale, 4, 32, -8 * a.scale)
    mixed = np.concatenate([affine, pad])  # zero padding joins an affine weight as zero nibbles / offsets
    np.testing.assert_allclose(mixed.dequantize()[:8], a.dequantize(), atol=1e-6)
    assert not mixed.dequantize()[8:].any()
    assert np.array_equal(np.asarray(a.map_rows(lambda r: r[::-1])), a.dequantize()[::-1])
    assert np.array_equal(np.asarray(a.T), a.dequantize().T) if hasattr(a, "T") else True


def dequantized_model(hf, config: QuantizationConfig):
    """A copy of HF model `hf` whose quantizable weights (every Linear / Conv1D / Embedding weight)
    are replaced by dequantize(quantize(w)), grouped along each weight's input dim as nx stores it."""
    import copy

    from transformers.pytorch_utils import Conv1D

    ref = copy.deepcopy(hf)
    done: set[int] = set()
    for module in ref.modules():
        if not isinstance(module, (torch.nn.Linear, torch.nn.Embedding, Conv1D)):
            continue
        p = module.weight
        if id(p) in done:  # a tied table
            continue
        done.add(id(p))
        w = p.detach().float().numpy()
        w = w.T if isinstance(module, Conv1D) else w  # nx stores [out, in]
        if config.group_size is None:
            q, scale = quantize(w)
            back = q.astype(np.float32) * scale[:, None]
        else:
            back = dequantize_groups(*quantize_groups(w, config.bits, config.group_size), config.bits, config.group_size)
        back = back.T if isinstance(module, Conv1D) else back
        with torch.no_grad():
            p.copy_(torch.from_numpy(np.ascontiguousarray(back)))
    return ref


CONFIGS = [QuantizationConfig("s4"), QuantizationConfig("s8"), QuantizationConfig("s8", group_size=16)]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: f"{c.quant_dtype}-g{c.group_size}")
@pytest.mark.parametrize("case", FIRST_OF_EACH, ids=str)
def test_greedy_equals_the_dequantized_model(saved_case, tmp_path, case, config):
    """nx with quantized weights writes the same greedy tokens as HF running the dequantized
    weights in f32 (the quantization itself is the only difference allowed)."""
    hf, path = saved_case(case)
    ref = dequantized_model(hf, config)
    q = nx.load(case.family, path, quant=config, **OPTS)
    assert "layers.0.qkv.w" in quantized_names(q.params)
    ids, mask = left_padded([9, 5], case.vocab, seed=11)
    if config.group_size is None:  # per-row int8: two activation terms a row (~15 bits)
        assert_same_greedy(ref, q, ids, mask, 12)
    else:  # one int8 activation term per block of 32 inputs (~8 bits): near-ties may flip
        assert_same_greedy(ref, q, ids, mask, 12, GROUPED_TIE)


def test_s4_under_tensor_parallelism_and_group_checks(saved_case, tmp_path):
    """tp=2 s4 gives tp=1 s4's logits; row-parallel shards split the group scales; a group size
    that does not tile a shard is a ConfigError naming the valid ones; an s4 artifact restores."""
    case = LLAMA[0]
    _, path = saved_case(case)
    opts = dict(n_positions=[32], context_length_estimate=[16], progress=False, quant="s4")
    one = nx.load("llama", path, **opts)
    two = nx.load("llama", path, tp_degree=2, **opts)
    ids, _ = left_padded([9], case.vocab, seed=7)
    a, b = one.logits(ids), two.logits(ids)
    assert np.abs(a - b).max() <= 1e-4 * np.abs(a).max() and (a.argmax(-1) == b.argmax(-1)).all()

    def shards(arr):
        return [tuple(s.data.shape) for s in arr.addressable_shards]

    layer = two.params["layers"][0]
    o, qkv = layer["o"]["w"], layer["qkv"]["w"]  # o: [64, 64] row-parallel; qkv: [128, 64] column
    if cpu_kernels.enabled():  # the panel layout (16 rows, blocks of 32 inputs): the same splits
        assert o.panel and qkv.panel
        assert shards(o.q) == [(4, 1, 256)] * 2 and shards(o.scale) == [(4, 1, 16)] * 2  # blocks split
        assert shards(qkv.q) == [(4, 2, 256)] * 2 and shards(qkv.scale) == [(4, 2, 16)] * 2  # panels split
    else:
        assert shards(o.q) == [(64, 16)] * 2 and shards(o.scale) == [(64, 1)] * 2  # inputs and groups split
        assert shards(qkv.q) == [(64, 32)] * 2 and shards(qkv.scale) == [(64, 2)] * 2  # rows split
    with pytest.raises(nx.ConfigError, match=r"Valid group sizes at tp_degree=2: \[16, 32\]"):
        nx.load("llama", path, tp_degree=2, **{**opts, "quant": QuantizationConfig("s4", group_size=64)})
    with pytest.raises(nx.ConfigError, match=r"Valid group sizes: \[16, 32, 64\]"):
        nx.load("llama", path, **{**opts, "quant": QuantizationConfig("s4", group_size=128)})
    one.save(tmp_path / "art")
    back = nx.load(tmp_path / "art", quant="s4")
    w = back.params["layers"][0]["o"]["w"]
    assert (w.bits, w.group_size, w.q.dtype, w.panel) == (4, 32, np.uint8, cpu_kernels.enabled())
    np.testing.assert_array_equal(back.logits(ids), a)


def test_cli_quant_options():
    from nx.cli import quant_config as _quant_config

    assert _quant_config("s4", group_size=64) == QuantizationConfig("s4", group_size=64)
    assert _quant_config("s8") == QuantizationConfig("s8") and _quant_config("f32") == "f32"
    assert _quant_config(None) is None
    with pytest.raises(nx.ConfigError, match="--group-size needs --quant s8 or s4"):
        _quant_config(None, group_size=32)
    with pytest.raises(nx.ConfigError, match="--group-size needs"):
        _quant_config("f32", group_size=32)
