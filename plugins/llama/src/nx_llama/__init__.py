"""LLaMA family for nx: RMSNorm, rotary positions (llama3 scaling), SwiGLU MLP, GQA/MQA."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

import numpy as np

import nx
from nx import names as N
from nx.checkpoint import unpermute_gguf_rotary
from nx.family import Family, WeightMap, dense, fused_dense, norm, tensor
from nx.hfconfig import activation_name, rope_parameters
from nx.spec import ModelSpec, RopeSpec


def spec_from_config(cfg: Any) -> ModelSpec:
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    theta, scaling = rope_parameters(cfg)
    return ModelSpec(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        n_kv_heads=getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
        norm="rms",
        norm_eps=cfg.rms_norm_eps,
        activation=activation_name(cfg.hidden_act, cfg.model_type),
        gated_mlp=True,
        positions="rope",
        max_positions=cfg.max_position_embeddings,
        rope=RopeSpec(theta, head_dim, "half", scaling),
        tied_lm_head=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(cfg, "attention_bias", False)),
        mlp_bias=bool(getattr(cfg, "mlp_bias", False)),
    )


def weights(spec: ModelSpec) -> WeightMap:
    h, v, d = spec.hidden_size, spec.vocab_size, spec.head_dim
    inter = spec.intermediate_size
    attn_bias, mlp_bias = spec.attention_bias, spec.mlp_bias
    w = {f"{N.EMBED}.{N.W}": tensor("model.embed_tokens.weight", (v, h)), **norm("model.norm", N.FINAL_NORM, h, bias=False)}
    if not spec.tied_lm_head:
        w[f"{N.LM_HEAD}.{N.W}"] = tensor("lm_head.weight", (v, h))  # [vocab, hidden], like the embedding
    for i in range(spec.n_layers):
        src, dst = f"model.layers.{i}.", N.layer(i)
        w |= norm(src + "input_layernorm", dst + N.ATTN_NORM, h, bias=False)
        w |= norm(src + "post_attention_layernorm", dst + N.MLP_NORM, h, bias=False)
        qkv = tuple(f"{src}self_attn.{n}_proj" for n in "qkv")
        w |= fused_dense(qkv, dst + N.QKV, (h, spec.qkv_dim), attn_bias)
        w |= dense(src + "self_attn.o_proj", dst + N.O, (spec.n_heads * d, h), attn_bias)
        w |= fused_dense((src + "mlp.gate_proj", src + "mlp.up_proj"), dst + N.UP, (h, 2 * inter), mlp_bias)
        w |= dense(src + "mlp.down_proj", dst + N.DOWN, (inter, h), mlp_bias)
    return w


_GGUF_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_GGUF_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _same(a: np.ndarray) -> np.ndarray:
    return a


def from_gguf(name: str, cfg: Any) -> tuple[str, Callable[[np.ndarray], np.ndarray]] | None:
    """llama.cpp tensor name -> HF name, undoing the converter's q/k permutation."""
    stem, _, kind = name.rpartition(".")
    if stem in _GGUF_TOP:
        return f"{_GGUF_TOP[stem]}.{kind}", _same
    m = re.fullmatch(r"blk\.(\d+)\.(\w+)", stem)
    if not m or m.group(2) not in _GGUF_BLOCK:
        return None  # e.g. rope_freqs: recomputed from the config
    part = m.group(2)
    hf = f"model.layers.{m.group(1)}.{_GGUF_BLOCK[part]}.{kind}"
    if part == "attn_q":
        return hf, lambda a: unpermute_gguf_rotary(a, cfg.num_attention_heads)
    if part == "attn_k":
        return hf, lambda a: unpermute_gguf_rotary(a, cfg.num_key_value_heads)
    return hf, _same


FAMILY = Family(
    name="llama",
    model_types=("llama",),
    architectures=("LlamaForCausalLM",),
    spec_from_config=spec_from_config,
    weights=weights,
    base_prefix="model.",
    ignore=(r"model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq", r"lm_head\.weight"),
    from_gguf=from_gguf,
    description="LLaMA 1/2/3, SmolLM2, TinyLlama: RMSNorm, RoPE, SwiGLU, GQA",
)


@nx.hookimpl
def nx_register_families(register) -> None:
    register(FAMILY)
