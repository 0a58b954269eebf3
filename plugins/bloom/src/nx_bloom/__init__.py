"""BLOOM family for nx: ALiBi, embedding LayerNorm, per-head interleaved fused ``query_key_value``,
GELU (tanh approximation), tied lm head."""

from __future__ import annotations

from typing import Any

import nx
from nx import names as N
from nx.errors import ConfigError
from nx.family import Family, WeightMap, dense, norm, per_head_qkv, tensor
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
        block="sequential_from_norm" if getattr(cfg, "apply_residual_connection_post_layernorm", False) else "sequential",
        tied_lm_head=bool(getattr(cfg, "tie_word_embeddings", True)),
        # pretraining_tp / slow_but_exact only split the same matmuls into slices: same math, ignored.
    )


def weights(spec: ModelSpec) -> WeightMap:
    h, v, inter = spec.hidden_size, spec.vocab_size, spec.intermediate_size
    top = "transformer."
    w = {
        f"{N.EMBED}.{N.W}": tensor(top + "word_embeddings.weight", (v, h)),
        **norm(top + "word_embeddings_layernorm", N.EMBED_NORM, h),
        **norm(top + "ln_f", N.FINAL_NORM, h),
    }
    if not spec.tied_lm_head:
        w[f"{N.LM_HEAD}.{N.W}"] = tensor("lm_head.weight", (v, h))  # [vocab, hidden], like a tied table
    for i in range(spec.n_layers):
        src, dst = f"{top}h.{i}.", N.layer(i)
        w |= norm(src + "input_layernorm", dst + N.ATTN_NORM, h)
        w |= norm(src + "post_attention_layernorm", dst + N.MLP_NORM, h)
        w |= per_head_qkv(src + "self_attention.query_key_value", dst + N.QKV, spec.n_heads, spec.head_dim, h)
        w |= dense(src + "self_attention.dense", dst + N.O, (h, h))
        w |= dense(src + "mlp.dense_h_to_4h", dst + N.UP, (h, inter))
        w |= dense(src + "mlp.dense_4h_to_h", dst + N.DOWN, (inter, h))
    return w


FAMILY = Family(
    name="bloom",
    model_types=("bloom",),
    architectures=("BloomForCausalLM",),
    spec_from_config=spec_from_config,
    weights=weights,
    base_prefix="transformer.",
    ignore=(r"lm_head\.weight",),
    description="BLOOM: ALiBi, embedding LayerNorm, interleaved fused query_key_value, GELU (tanh)",
)


@nx.hookimpl
def nx_register_families(register) -> None:
    register(FAMILY)
