"""GPT-2 family for nx: learned positions, pre-LayerNorm, GELU MLP, fused Conv1D ``c_attn``."""

from __future__ import annotations

from typing import Any

import nx
from nx.errors import ConfigError
from nx.family import Family, WeightMap, tensor
from nx.hfconfig import activation_name
from nx.spec import ModelSpec


def spec_from_config(cfg: Any) -> ModelSpec:
    if getattr(cfg, "scale_attn_by_inverse_layer_idx", False):
        raise ConfigError("gpt2: scale_attn_by_inverse_layer_idx=True is not supported")
    head_dim = cfg.n_embd // cfg.n_head
    return ModelSpec(
        model_type=cfg.model_type,
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.n_embd,
        n_layers=cfg.n_layer,
        n_heads=cfg.n_head,
        head_dim=head_dim,
        intermediate_size=cfg.n_inner or 4 * cfg.n_embd,
        norm="layer",
        norm_eps=cfg.layer_norm_epsilon,
        activation=activation_name(cfg.activation_function, cfg.model_type),
        positions="learned",
        max_positions=cfg.n_positions,
        tied_lm_head=bool(getattr(cfg, "tie_word_embeddings", True)),
        attn_scale=None if getattr(cfg, "scale_attn_weights", True) else 1.0,
    )


def weights(spec: ModelSpec) -> WeightMap:
    h, v, inter = spec.hidden_size, spec.vocab_size, spec.intermediate_size
    w = {
        "embed.w": tensor("transformer.wte.weight", (v, h)),
        "pos.w": tensor("transformer.wpe.weight", (spec.max_positions, h)),
        "final_norm.w": tensor("transformer.ln_f.weight", (h,)),
        "final_norm.b": tensor("transformer.ln_f.bias", (h,)),
    }
    if not spec.tied_lm_head:
        w["lm_head.w"] = tensor("lm_head.weight", (v, h))  # kept [vocab, hidden] like a tied table
    shapes = {"attn.c_attn": (h, 3 * h), "attn.c_proj": (h, h), "mlp.c_fc": (h, inter), "mlp.c_proj": (inter, h)}
    names = {"attn.c_attn": "qkv", "attn.c_proj": "o", "mlp.c_fc": "up", "mlp.c_proj": "down"}
    for i in range(spec.n_layers):
        src, dst = f"transformer.h.{i}.", f"layers.{i}."
        for ln, nxname in (("ln_1", "attn_norm"), ("ln_2", "mlp_norm")):
            w[f"{dst}{nxname}.w"] = tensor(f"{src}{ln}.weight", (h,))
            w[f"{dst}{nxname}.b"] = tensor(f"{src}{ln}.bias", (h,))
        for hf, shape in shapes.items():  # Conv1D weights are already [in, out]
            w[f"{dst}{names[hf]}.w"] = tensor(f"{src}{hf}.weight", shape)
            w[f"{dst}{names[hf]}.b"] = tensor(f"{src}{hf}.bias", shape[1:])
    return w


FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    architectures=("GPT2LMHeadModel",),
    spec_from_config=spec_from_config,
    weights=weights,
    ignore=(r"transformer\.h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
    description="GPT-2: learned positions, LayerNorm, GELU, fused c_attn",
)


@nx.hookimpl
def nx_register_families(register) -> None:
    register(FAMILY)
