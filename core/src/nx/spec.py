"""`ModelSpec`: nx's family-neutral description of a decoder, built by each plugin from an HF config.

The generic decoder in `nx.decoder` composes `nx.ops` according to these fields, so a family plugin
only translates its config and checkpoint keys; it never re-implements attention or norms.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

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
        if self.n_heads % self.kv_heads:
            raise ConfigError(
                f"{self.model_type}: num_attention_heads={self.n_heads} is not a multiple of "
                f"num_key_value_heads={self.kv_heads}; fix the checkpoint's config.json."
            )
        if self.block not in Block.__args__:
            raise ConfigError(f"{self.model_type}: block={self.block!r} is not one of {', '.join(Block.__args__)}")
        if self.positions == "rope" and self.rope is None:
            raise ConfigError(f"{self.model_type}: rotary positions need a RopeSpec")
