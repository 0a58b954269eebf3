"""BLOOM family for nx: ALiBi, embedding LayerNorm, per-head interleaved fused ``query_key_value``,
GELU (tanh approximation), tied lm head."""

from __future__ import annotations

from typing import Any

import numpy as np

import nx
from nx.errors import ConfigError
from nx.family import Family, Weight, WeightMap, linear, split_heads_qkv, tensor
from nx.spec import ModelSpec


def spec_from_config(cfg: Any) -> ModelSpec:
    hidden, heads = cfg.hidden_size, cfg.n_head
    if hidden % heads:
        raise ConfigError(f"bloom: hidden_size={hidden} is not a multiple of n_head={heads}")
    return ModelSpec(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=hidden,
        n_layers=cfg.n_layer,
        n_heads=heads,
        head_dim=hidden // heads,
        intermediate_size=4 * hidden,  # BloomMLP is always 4x
        norm="layer",
        norm_eps=cfg.layer_norm_epsilon,
        activation="gelu_tanh",  # bloom_gelu_forward
        positions="alibi",
        max_positions=getattr(cfg, "seq_length", None) or 2048,  # ALiBi has no table; informational
        embed_norm=True,
        residual_from_norm=bool(getattr(cfg, "apply_residual_connection_post_layernorm", False)),
        tied_lm_head=bool(getattr(cfg, "tie_word_embeddings", True)),
        # pretraining_tp / slow_but_exact only split the same matmuls into slices: same math, ignored.
    )


def _qkv(spec: ModelSpec, key: str, shape: tuple[int, ...]) -> Weight:
    """``query_key_value`` rows ``[heads, 3, head_dim]`` -> nx's ``[q | k | v]``; weights then to ``[in, out]``."""
    reorder = split_heads_qkv(spec.n_heads, spec.head_dim)
    if len(shape) == 1:
        return Weight((key,), reorder, shape)
    return Weight((key,), lambda a: np.ascontiguousarray(reorder(a).T), shape)


def weights(spec: ModelSpec) -> WeightMap:
    h, v, inter = spec.hidden_size, spec.vocab_size, spec.intermediate_size
    top = "transformer."
    w = {
        "embed.w": tensor(top + "word_embeddings.weight", (v, h)),
        "embed_norm.w": tensor(top + "word_embeddings_layernorm.weight", (h,)),
        "embed_norm.b": tensor(top + "word_embeddings_layernorm.bias", (h,)),
        "final_norm.w": tensor(top + "ln_f.weight", (h,)),
        "final_norm.b": tensor(top + "ln_f.bias", (h,)),
    }
    if not spec.tied_lm_head:
        w["lm_head.w"] = tensor("lm_head.weight", (v, h))  # [vocab, hidden], like a tied table
    for i in range(spec.n_layers):
        src, dst = f"{top}h.{i}.", f"layers.{i}."
        for ln, nxname in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
            w[f"{dst}{nxname}.w"] = tensor(f"{src}{ln}.weight", (h,))
            w[f"{dst}{nxname}.b"] = tensor(f"{src}{ln}.bias", (h,))
        w[dst + "qkv.w"] = _qkv(spec, src + "self_attention.query_key_value.weight", (h, spec.qkv_dim))
        w[dst + "qkv.b"] = _qkv(spec, src + "self_attention.query_key_value.bias", (spec.qkv_dim,))
        w[dst + "o.w"] = linear(src + "self_attention.dense.weight", (h, h))
        w[dst + "o.b"] = tensor(src + "self_attention.dense.bias", (h,))
        w[dst + "up.w"] = linear(src + "mlp.dense_h_to_4h.weight", (h, inter))
        w[dst + "up.b"] = tensor(src + "mlp.dense_h_to_4h.bias", (inter,))
        w[dst + "down.w"] = linear(src + "mlp.dense_4h_to_h.weight", (inter, h))
        w[dst + "down.b"] = tensor(src + "mlp.dense_4h_to_h.bias", (h,))
    return w


FAMILY = Family(
    name="bloom",
    model_types=("bloom",),
    architectures=("BloomForCausalLM",),
    spec_from_config=spec_from_config,
    weights=weights,
    ignore=(r"lm_head\.weight",),
    description="BLOOM: ALiBi, embedding LayerNorm, interleaved fused query_key_value, GELU (tanh)",
)


@nx.hookimpl
def nx_register_families(register) -> None:
    register(FAMILY)
