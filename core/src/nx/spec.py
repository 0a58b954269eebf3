"""`ModelSpec`: nx's family-neutral description of a decoder, built by each plugin from an HF config.

The generic decoder in `nx.decoder` composes `nx.ops` according to these fields, so a family plugin
only translates its config and checkpoint keys; it never re-implements attention or norms.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Literal, get_args

from nx.errors import ConfigError

Norm = Literal["layer", "rms"]
Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]
Positions = Literal["learned", "rope", "alibi"]
RopeStyle = Literal["half", "interleaved"]
#: How a transformer block wires its residuals (`nx.decoder.BLOCKS` implements each):
#: "sequential" x + attn(norm(x)), then + mlp(norm'(.)) (pre-norm: GPT-2, LLaMA, OPT-125m ...);
#: "parallel" x + attn(norm(x)) + mlp(norm'(x)) (GPT-NeoX); "parallel_shared_norm" the same with one
#: norm for both branches (GPT-J); "post_norm" norm(x + attn(x)), then norm'(. + mlp(.)) (OPT-350m);
#: "sequential_from_norm" pre-norm whose residual is the normed input (a BLOOM option).
Block = Literal["sequential", "parallel", "parallel_shared_norm", "post_norm", "sequential_from_norm"]


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding: `theta` base, `rotary_dim` leading dims of each head rotated.

    style "half" rotates the two halves of the rotated dims (LLaMA, NeoX); "interleaved" rotates
    adjacent pairs (GPT-J). `scaling` is the HF ``rope_scaling`` dict (llama3 / linear) or None.
    """

    theta: float
    rotary_dim: int
    style: RopeStyle = "half"
    scaling: tuple[tuple[str, object], ...] | None = None  # frozen form of a dict

    @property
    def scaling_dict(self) -> dict:
        return dict(self.scaling or ())

    def __post_init__(self) -> None:
        if not _is_real(self.theta) or not self.theta > 0:
            raise ConfigError(f"rope theta must be a finite number > 0, got {self.theta!r}; fix config.json's rope_theta")
        if not _is_int(self.rotary_dim) or self.rotary_dim < 2 or self.rotary_dim % 2:
            raise ConfigError(f"rotary_dim must be an even int >= 2, got {self.rotary_dim!r}; fix config.json")
        if self.style not in get_args(RopeStyle):
            raise ConfigError(f"rope style must be one of {get_args(RopeStyle)}, got {self.style!r}")


@dataclass(frozen=True)
class ModelSpec:
    """Everything the generic decoder needs to know about one model's architecture."""

    model_type: str
    vocab_size: int
    hidden_size: int
    n_layers: int
    n_heads: int
    head_dim: int
    intermediate_size: int
    n_kv_heads: int | None = None  # None: same as n_heads (MHA)
    norm: Norm = "layer"
    norm_eps: float = 1e-5
    activation: Activation = "gelu"
    gated_mlp: bool = False  # SwiGLU-style act(gate) * up
    positions: Positions = "learned"
    max_positions: int = 2048  # size of a learned position table / trained context
    position_offset: int = 0  # OPT stores positions shifted by 2
    rope: RopeSpec | None = None
    block: Block = "sequential"
    embed_norm: bool = False  # norm right after the embedding (BLOOM)
    final_norm: bool = True
    tied_lm_head: bool = True
    lm_head_bias: bool = False
    project_dim: int | None = None  # OPT word_embed_proj_dim when it differs from hidden
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    attention_bias: bool = False  # q/k/v and output projections have biases
    mlp_bias: bool = False  # MLP projections have biases

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def embed_dim(self) -> int:
        """Width of the token embedding (differs from hidden only with OPT's projections)."""
        return self.project_dim or self.hidden_size

    @property
    def scale(self) -> float:
        return self.attn_scale if self.attn_scale is not None else self.head_dim**-0.5

    @property
    def qkv_dim(self) -> int:
        return (self.n_heads + 2 * self.kv_heads) * self.head_dim

    def __post_init__(self) -> None:
        """Reject values no model has (a zero head count, a NaN epsilon, a float layer count), so a
        broken config.json is one clear `ConfigError` instead of a ZeroDivisionError or NaN logits."""
        where = f"{self.model_type}: "
        fix = "; fix the checkpoint's config.json"
        for name in ("vocab_size", "hidden_size", "n_layers", "n_heads", "head_dim", "intermediate_size", "max_positions"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ConfigError(f"{where}{name} must be a positive int, got {value!r}{fix}")
        for name in ("n_kv_heads", "project_dim"):
            value = getattr(self, name)
            if value is not None and (not _is_int(value) or value < 1):
                raise ConfigError(f"{where}{name} must be a positive int or None, got {value!r}{fix}")
        if not _is_int(self.position_offset) or self.position_offset < 0:
            raise ConfigError(f"{where}position_offset must be an int >= 0, got {self.position_offset!r}")
        if not _is_real(self.norm_eps) or self.norm_eps < 0:
            raise ConfigError(f"{where}norm epsilon must be a finite number >= 0, got {self.norm_eps!r}{fix}")
        if self.attn_scale is not None and not _is_real(self.attn_scale):
            raise ConfigError(f"{where}attn_scale must be a finite number or None, got {self.attn_scale!r}")
        for name, kind in (("norm", Norm), ("activation", Activation), ("positions", Positions)):
            if getattr(self, name) not in get_args(kind):
                raise ConfigError(f"{where}{name} must be one of {get_args(kind)}, got {getattr(self, name)!r}")
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"{self.model_type}: num_attention_heads={self.n_heads} is not a multiple of "
                f"num_key_value_heads={self.kv_heads}; fix the checkpoint's config.json."
            )
        if self.block not in Block.__args__:
            raise ConfigError(f"{self.model_type}: block={self.block!r} is not one of {', '.join(Block.__args__)}")
        if self.positions == "rope" and self.rope is None:
            raise ConfigError(f"{self.model_type}: rotary positions need a RopeSpec")


def check_load(spec: ModelSpec, n_positions: int, n_tensors: int) -> None:
    """Whether `spec` can serve a load asking for `n_positions` positions (the largest bucket) from
    a checkpoint of `n_tensors` tensors; a `ConfigError` saying what to change if not.

    A learned position table has no row beyond its size: positions past it would read outside the
    table (NaN logits, not an error). A config claiming more layers than the checkpoint has tensors
    is not this checkpoint's config, and its weight map would be built before any key check fails.
    """
    if spec.positions == "learned" and n_positions > spec.max_positions:
        raise ConfigError(
            f"n_positions {n_positions} exceeds the {spec.max_positions} positions of this {spec.model_type} "
            f"model's learned position table (config.json's n_positions / max_position_embeddings); load it "
            f"with n_positions <= {spec.max_positions}"
        )
    if spec.n_layers > n_tensors:
        raise ConfigError(
            f"config.json gives {spec.n_layers} layers but the checkpoint holds only {n_tensors} tensors; "
            "the config does not belong to these weights"
        )


def _is_int(value: object) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
