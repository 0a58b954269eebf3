"""GPT-J family for nx: interleaved (rotate-every-two) rotary on the leading ``rotary_dim`` dims of
each head, attention and MLP in parallel from one LayerNorm, bias-free q/k/v/out, biased lm head."""

from __future__ import annotations

from typing import Any

import nx
from nx import names as N
from nx.errors import ConfigError
from nx.family import Family, WeightMap, dense, fused_dense, norm, tensor
from nx.hfconfig import activation_name
from nx.spec import ModelSpec, RopeSpec

ROPE_THETA = 10000.0  # fixed in GPT-J (create_sinusoidal_positions)


def spec_from_config(cfg: Any) -> ModelSpec:
    if cfg.n_embd % cfg.n_head:
        raise ConfigError(
            f"gptj: n_embd={cfg.n_embd} is not a multiple of n_head={cfg.n_head}; fix the checkpoint's config.json"
        )
    head_dim = cfg.n_embd // cfg.n_head
    rotary_dim = getattr(cfg, "rotary_dim", None)
    if rotary_dim is None:
        # HF then builds its sin/cos table over n_embd dims and rotates whole heads, which only has
        # matching shapes when there is one head (transformers 5 no longer accepts rotary_dim=None).
        if cfg.n_head != 1:
            raise ConfigError(
                "gptj: rotary_dim=None with more than one head is not supported (Hugging Face's GPT-J cannot "
                "run it either); set rotary_dim in config.json"
            )
        rotary_dim = head_dim
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > head_dim:
        raise ConfigError(
            f"gptj: rotary_dim={rotary_dim} is not supported; it must be even and in 2..head_dim ({head_dim})"
        )
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
        positions="rope",
        max_positions=cfg.n_positions,
        rope=RopeSpec(ROPE_THETA, rotary_dim, "interleaved"),
        block="parallel_shared_norm",
        tied_lm_head=bool(getattr(cfg, "tie_word_embeddings", False)),
        lm_head_bias=True,
    )


def weights(spec: ModelSpec) -> WeightMap:
    h, v, inter = spec.hidden_size, spec.vocab_size, spec.intermediate_size
    w = {
        f"{N.EMBED}.{N.W}": tensor("transformer.wte.weight", (v, h)),
        **norm("transformer.ln_f", N.FINAL_NORM, h),
        f"{N.LM_HEAD}.{N.B}": tensor("lm_head.bias", (v,)),
    }
    if not spec.tied_lm_head:
        w[f"{N.LM_HEAD}.{N.W}"] = tensor("lm_head.weight", (v, h))  # [vocab, hidden], like the embedding
    for i in range(spec.n_layers):
        src, dst = f"transformer.h.{i}.", N.layer(i)
        w |= norm(src + "ln_1", dst + N.ATTN_NORM, h)
        w |= fused_dense(tuple(f"{src}attn.{n}_proj" for n in "qkv"), dst + N.QKV, (h, spec.qkv_dim), bias=False)
        w |= dense(src + "attn.out_proj", dst + N.O, (h, h), bias=False)
        w |= dense(src + "mlp.fc_in", dst + N.UP, (h, inter))
        w |= dense(src + "mlp.fc_out", dst + N.DOWN, (inter, h))
    return w


FAMILY = Family(
    name="gptj",
    model_types=("gptj",),
    architectures=("GPTJForCausalLM",),
    spec_from_config=spec_from_config,
    weights=weights,
    base_prefix="transformer.",
    ignore=(r"transformer\.h\.\d+\.attn\.(masked_)?bias", r"lm_head\.weight"),
    description="GPT-J: interleaved partial rotary, parallel attention + MLP from one LayerNorm",
)


@nx.hookimpl
def nx_register_families(register) -> None:
    register(FAMILY)
