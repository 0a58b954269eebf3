"""`ModelSpec`: nx's family-neutral description of a decoder, built by each plugin from an HF config.

The generic decoder in `nx.decoder` composes `nx.ops` according to these fields, so a family plugin
only translates its config and checkpoint keys; it never re-implements attention or norms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

Norm = Literal["layer", "rms"]
Activation = Literal["gelu", "gelu_tanh", "relu", "silu"]
Positions = Literal["learned", "rope", "alibi"]
RopeStyle = Literal["half", "interleaved"]


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
    parallel_residual: bool = False  # x + attn(ln(x)) + mlp(ln'(x))
    shared_norm: bool = False  # parallel residual with one norm for both branches (GPT-J)
    post_norm: bool = False  # norm after the residual add (OPT-350m)
    residual_from_norm: bool = False  # pre-norm block whose residual is the normed input (BLOOM option)
    embed_norm: bool = False  # norm right after the embedding (BLOOM)
    final_norm: bool = True
    tied_lm_head: bool = True
    lm_head_bias: bool = False
    project_dim: int | None = None  # OPT word_embed_proj_dim when it differs from hidden
    attn_scale: float | None = None  # None: 1/sqrt(head_dim)
    extras: dict = field(default_factory=dict, compare=False, hash=False)

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
        from nx.errors import ConfigError

        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"{self.model_type}: num_attention_heads={self.n_heads} is not a multiple of "
                f"num_key_value_heads={self.kv_heads}; fix the checkpoint's config.json."
            )
        if self.residual_from_norm and (self.parallel_residual or self.post_norm):
            raise ConfigError(f"{self.model_type}: residual_from_norm applies to sequential pre-norm blocks only")
        if self.positions == "rope" and self.rope is None:
            raise ConfigError(f"{self.model_type}: rotary positions need a RopeSpec")
