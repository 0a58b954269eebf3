"""OPT family for nx: learned positions offset by 2, pre- or post-LayerNorm, optional
``word_embed_proj_dim`` projections (opt-350m), ReLU MLP, optional linear biases."""

from __future__ import annotations

from typing import Any

import nx
from nx.errors import ConfigError
from nx.family import Family, WeightMap, fused_linear, fused_vector, linear, tensor
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
        post_norm=not pre_norm,
        # OPTDecoder builds its final LayerNorm only for pre-norm models (and not for old fine-tunes)
        final_norm=pre_norm and not getattr(cfg, "_remove_final_layer_norm", False),
        tied_lm_head=bool(getattr(cfg, "tie_word_embeddings", True)),
        project_dim=proj if proj != hidden else None,
        extras={"bias": bool(getattr(cfg, "enable_bias", True))},
    )


def weights(spec: ModelSpec) -> WeightMap:
    h, v, e, inter = spec.hidden_size, spec.vocab_size, spec.embed_dim, spec.intermediate_size
    top = "model.decoder."
    w = {
        "embed.w": tensor(top + "embed_tokens.weight", (v, e)),
        "pos.w": tensor(top + "embed_positions.weight", (spec.max_positions + spec.position_offset, h)),
    }
    if spec.final_norm:
        w["final_norm.w"] = tensor(top + "final_layer_norm.weight", (h,))
        w["final_norm.b"] = tensor(top + "final_layer_norm.bias", (h,))
    if spec.project_dim:
        w["project_in.w"] = linear(top + "project_in.weight", (e, h))
        w["project_out.w"] = linear(top + "project_out.weight", (h, e))
    if not spec.tied_lm_head:
        w["lm_head.w"] = tensor("lm_head.weight", (v, e))  # [vocab, embed], like a tied table
    bias = spec.extras.get("bias", True)
    for i in range(spec.n_layers):
        src, dst = f"{top}layers.{i}.", f"layers.{i}."
        qkv = tuple(f"{src}self_attn.{n}_proj" for n in "qkv")
        for ln, nxname in (("self_attn_layer_norm", "attn_norm"), ("final_layer_norm", "mlp_norm")):
            w[f"{dst}{nxname}.w"] = tensor(f"{src}{ln}.weight", (h,))
            w[f"{dst}{nxname}.b"] = tensor(f"{src}{ln}.bias", (h,))
        w[dst + "qkv.w"] = fused_linear(tuple(k + ".weight" for k in qkv), (h, spec.qkv_dim))
        w[dst + "o.w"] = linear(src + "self_attn.out_proj.weight", (h, h))
        w[dst + "up.w"] = linear(src + "fc1.weight", (h, inter))
        w[dst + "down.w"] = linear(src + "fc2.weight", (inter, h))
        if bias:
            w[dst + "qkv.b"] = fused_vector(tuple(k + ".bias" for k in qkv), (spec.qkv_dim,))
            w[dst + "o.b"] = tensor(src + "self_attn.out_proj.bias", (h,))
            w[dst + "up.b"] = tensor(src + "fc1.bias", (inter,))
            w[dst + "down.b"] = tensor(src + "fc2.bias", (h,))
    return w


FAMILY = Family(
    name="opt",
    model_types=("opt",),
    architectures=("OPTForCausalLM",),
    spec_from_config=spec_from_config,
    weights=weights,
    ignore=(r"lm_head\.weight",),
    description="OPT: learned positions (offset 2), pre/post LayerNorm, ReLU, word_embed_proj_dim projections",
)


@nx.hookimpl
def nx_register_families(register) -> None:
    register(FAMILY)
