"""GPT-2 family for nx: learned positions, pre-LayerNorm, GELU MLP, fused Conv1D ``c_attn``."""

from __future__ import annotations

from typing import Any

import nx
from nx import names as N
from nx.errors import ConfigError
from nx.family import Family, WeightMap, dense, norm, tensor
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
        f"{N.EMBED}.{N.W}": tensor("transformer.wte.weight", (v, h)),
        f"{N.POS}.{N.W}": tensor("transformer.wpe.weight", (spec.max_positions, h)),
        **norm("transformer.ln_f", N.FINAL_NORM, h),
    }
    if not spec.tied_lm_head:
        w[f"{N.LM_HEAD}.{N.W}"] = tensor("lm_head.weight", (v, h))  # kept [vocab, hidden] like a tied table
    for i in range(spec.n_layers):
        src, dst = f"transformer.h.{i}.", N.layer(i)
        w |= norm(src + "ln_1", dst + N.ATTN_NORM, h) | norm(src + "ln_2", dst + N.MLP_NORM, h)
        # Conv1D weights are stored [in, out]; dense(conv1d=True) transposes them to [out, in]
        w |= dense(src + "attn.c_attn", dst + N.QKV, (h, 3 * h), conv1d=True)
        w |= dense(src + "attn.c_proj", dst + N.O, (h, h), conv1d=True)
        w |= dense(src + "mlp.c_fc", dst + N.UP, (h, inter), conv1d=True)
        w |= dense(src + "mlp.c_proj", dst + N.DOWN, (inter, h), conv1d=True)
    return w


FAMILY = Family(
    name="gpt2",
    model_types=("gpt2",),
    architectures=("GPT2LMHeadModel",),
    spec_from_config=spec_from_config,
    weights=weights,
    base_prefix="transformer.",
    ignore=(r"transformer\.h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
    description="GPT-2: learned positions, LayerNorm, GELU, fused c_attn",
)


@nx.hookimpl
def nx_register_families(register) -> None:
    register(FAMILY)
