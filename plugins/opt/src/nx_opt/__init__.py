"""OPT family for nx: learned positions offset by 2, pre- or post-LayerNorm, optional
``word_embed_proj_dim`` projections (opt-350m), ReLU MLP, optional linear biases."""

from __future__ import annotations

from typing import Any

import nx
from nx import names as N
from nx.errors import ConfigError
from nx.family import Family, WeightMap, dense, fused_dense, norm, tensor
from nx.hfconfig import activation_name
from nx.spec import ModelSpec

#: OPTLearnedPositionalEmbedding stores position p at row p + 2 (a fairseq padding_idx legacy).
POSITION_OFFSET = 2


def spec_from_config(cfg: Any) -> ModelSpec:
    if not getattr(cfg, "layer_norm_elementwise_affine", True):
        raise ConfigError("opt: layer_norm_elementwise_affine=False (LayerNorms without weights) is not supported")
    hidden = cfg.hidden_size
    if hidden % cfg.num_attention_heads:
        raise ConfigError(
            f"opt: hidden_size={hidden} is not a multiple of num_attention_heads={cfg.num_attention_heads}"
        )
    proj = getattr(cfg, "word_embed_proj_dim", None) or hidden
    pre_norm = bool(getattr(cfg, "do_layer_norm_before", True))
    return ModelSpec(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=hidden,
        n_layers=cfg.num_hidden_layers,
        n_heads=cfg.num_attention_heads,
        head_dim=hidden // cfg.num_attention_heads,
        intermediate_size=cfg.ffn_dim,
        norm="layer",
        norm_eps=1e-5,  # nn.LayerNorm's default; OPT configs have no epsilon
        activation=activation_name(cfg.activation_function, cfg.model_type),
        positions="learned",
        max_positions=cfg.max_position_embeddings,
        position_offset=POSITION_OFFSET,
        block="sequential" if pre_norm else "post_norm",
        # OPTDecoder builds its final LayerNorm only for pre-norm models (and not for old fine-tunes)
        final_norm=pre_norm and not getattr(cfg, "_remove_final_layer_norm", False),
        tied_lm_head=bool(getattr(cfg, "tie_word_embeddings", True)),
        project_dim=proj if proj != hidden else None,
        attention_bias=bool(getattr(cfg, "enable_bias", True)),
        mlp_bias=bool(getattr(cfg, "enable_bias", True)),
    )


def weights(spec: ModelSpec) -> WeightMap:
    h, v, e, inter = spec.hidden_size, spec.vocab_size, spec.embed_dim, spec.intermediate_size
    top = "model.decoder."
    w = {
        f"{N.EMBED}.{N.W}": tensor(top + "embed_tokens.weight", (v, e)),
        f"{N.POS}.{N.W}": tensor(top + "embed_positions.weight", (spec.max_positions + spec.position_offset, h)),
    }
    if spec.final_norm:
        w |= norm(top + "final_layer_norm", N.FINAL_NORM, h)
    if spec.project_dim:
        w |= dense(top + "project_in", N.PROJECT_IN, (e, h), bias=False)
        w |= dense(top + "project_out", N.PROJECT_OUT, (h, e), bias=False)
    if not spec.tied_lm_head:
        w[f"{N.LM_HEAD}.{N.W}"] = tensor("lm_head.weight", (v, e))  # [vocab, embed], like a tied table
    bias = spec.attention_bias  # OPT's enable_bias sets both
    for i in range(spec.n_layers):
        src, dst = f"{top}layers.{i}.", N.layer(i)
        w |= norm(src + "self_attn_layer_norm", dst + N.ATTN_NORM, h)
        w |= norm(src + "final_layer_norm", dst + N.MLP_NORM, h)
        w |= fused_dense(tuple(f"{src}self_attn.{n}_proj" for n in "qkv"), dst + N.QKV, (h, spec.qkv_dim), bias)
        w |= dense(src + "self_attn.out_proj", dst + N.O, (h, h), bias)
        w |= dense(src + "fc1", dst + N.UP, (h, inter), bias)
        w |= dense(src + "fc2", dst + N.DOWN, (inter, h), bias)
    return w


FAMILY = Family(
    name="opt",
    model_types=("opt",),
    architectures=("OPTForCausalLM",),
    spec_from_config=spec_from_config,
    weights=weights,
    base_prefix="model.",
    ignore=(r"lm_head\.weight",),
    description="OPT: learned positions (offset 2), pre/post LayerNorm, ReLU, word_embed_proj_dim projections",
)


@nx.hookimpl
def nx_register_families(register) -> None:
    register(FAMILY)
