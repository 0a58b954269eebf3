"""GPT-NeoX family for nx: partial half-split rotary, parallel (or sequential) residual with two
LayerNorms, fused per-head ``query_key_value``, untied ``embed_out`` lm head."""

from __future__ import annotations

from typing import Any

import nx
from nx import names as N
from nx.errors import ConfigError
from nx.family import Family, WeightMap, dense, norm, per_head_qkv, tensor
from nx.hfconfig import activation_name, partial_rotary_factor, rope_parameters
from nx.spec import ModelSpec, RopeSpec


def spec_from_config(cfg: Any) -> ModelSpec:
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ConfigError(
            f"gpt_neox: hidden_size={cfg.hidden_size} is not a multiple of "
            f"num_attention_heads={cfg.num_attention_heads}; fix the checkpoint's config.json"
        )
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    # HF: rotary_ndims = int(head_size * partial_rotary_factor); transformers 4 calls it rotary_pct
    rotary_dim = int(head_dim * partial_rotary_factor(cfg, default=0.25))
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ConfigError(
            f"gpt_neox: rotary over {rotary_dim} of {head_dim} head dims is not supported "
            "(rotary_pct / partial_rotary_factor must give an even, non-zero number of dims)"
        )
    theta, scaling = rope_parameters(cfg, theta_attr="rotary_emb_base")
    return ModelSpec(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        head_dim=head_dim,
        intermediate_size=cfg.intermediate_size,
        norm="layer",
        norm_eps=cfg.layer_norm_eps,
        activation=activation_name(cfg.hidden_act, cfg.model_type),
        positions="rope",
        max_positions=cfg.max_position_embeddings,
        rope=RopeSpec(theta, rotary_dim, "half", scaling),
        block="parallel" if getattr(cfg, "use_parallel_residual", True) else "sequential",
        tied_lm_head=bool(getattr(cfg, "tie_word_embeddings", False)),
        attention_bias=bool(getattr(cfg, "attention_bias", True)),
    )


def weights(spec: ModelSpec) -> WeightMap:
    h, v, inter = spec.hidden_size, spec.vocab_size, spec.intermediate_size
    bias = spec.attention_bias
    w = {f"{N.EMBED}.{N.W}": tensor("gpt_neox.embed_in.weight", (v, h)), **norm("gpt_neox.final_layer_norm", N.FINAL_NORM, h)}
    if not spec.tied_lm_head:
        w[f"{N.LM_HEAD}.{N.W}"] = tensor("embed_out.weight", (v, h))  # [vocab, hidden], like the embedding
    for i in range(spec.n_layers):
        src, dst = f"gpt_neox.layers.{i}.", N.layer(i)
        w |= norm(src + "input_layernorm", dst + N.ATTN_NORM, h)
        w |= norm(src + "post_attention_layernorm", dst + N.MLP_NORM, h)
        w |= per_head_qkv(src + "attention.query_key_value", dst + N.QKV, spec.n_heads, spec.head_dim, h, bias)
        w |= dense(src + "attention.dense", dst + N.O, (h, h), bias)
        w |= dense(src + "mlp.dense_h_to_4h", dst + N.UP, (h, inter))
        w |= dense(src + "mlp.dense_4h_to_h", dst + N.DOWN, (inter, h))
    return w


FAMILY = Family(
    name="gptneox",
    model_types=("gpt_neox",),
    architectures=("GPTNeoXForCausalLM",),
    spec_from_config=spec_from_config,
    weights=weights,
    base_prefix="gpt_neox.",
    ignore=(
        r"gpt_neox\.layers\.\d+\.attention\.(masked_)?bias",
        r"gpt_neox\.layers\.\d+\.attention\.rotary_emb\.inv_freq",
        r"embed_out\.weight",  # only reached when tie_word_embeddings=True
        r"lm_head\.weight",
    ),
    description="GPT-NeoX, Pythia: partial rotary, parallel residual, fused per-head query_key_value",
)


@nx.hookimpl
def nx_register_families(register) -> None:
    register(FAMILY)
