"""nx parameter names: the contract between family plugins (which map checkpoint tensors to these
names) and the generic decoder, sharding and quantization (which read them). Defined once here.

A parameter's full name is dotted: ``embed.w``, ``layers.3.qkv.w``; `W` / `B` are a linear's or
norm's weight and bias.
"""

from __future__ import annotations

# per layer
QKV = "qkv"  # fused [q | k | v] projection, stored [out, in]
O = "o"  # attention output projection  # noqa: E741
UP = "up"  # MLP up projection ([gate | up] fused when the MLP is gated)
DOWN = "down"  # MLP down projection
ATTN_NORM = "attn_norm"
MLP_NORM = "mlp_norm"
LAYER = (QKV, O, UP, DOWN, ATTN_NORM, MLP_NORM)

# per model
EMBED = "embed"  # token table [vocab, embed dim]
POS = "pos"  # learned position table [positions, hidden]
EMBED_NORM = "embed_norm"
FINAL_NORM = "final_norm"
LM_HEAD = "lm_head"  # [vocab, embed dim] (absent when tied to EMBED)
PROJECT_IN = "project_in"  # OPT's embed dim -> hidden
PROJECT_OUT = "project_out"  # hidden -> embed dim
TOP = (EMBED, POS, EMBED_NORM, FINAL_NORM, LM_HEAD, PROJECT_IN, PROJECT_OUT)

W, B = "w", "b"

#: Tensor-parallel role of each parameter. Column-parallel weights split their output dim,
#: row-parallel ones their input dim (followed by an all-reduce), vocab-parallel the vocabulary.
ROLES: dict[str, str] = {
    f"{QKV}.{W}": "column", f"{QKV}.{B}": "column", f"{UP}.{W}": "column", f"{UP}.{B}": "column",
    f"{O}.{W}": "row", f"{DOWN}.{W}": "row",
    f"{EMBED}.{W}": "vocab", f"{LM_HEAD}.{W}": "vocab", f"{LM_HEAD}.{B}": "vocab",
}


def layer(i: int, name: str = "") -> str:
    """The full name of layer `i`'s parameter group `name` (``layers.3.qkv``), or with no name
    the prefix its parameters share (``layers.3.``)."""
    return f"layers.{i}.{name}"


def is_known(full: str) -> bool:
    """Whether `full` (``layers.3.qkv.w``, ``embed.w``) names a parameter the decoder reads."""
    parts = full.split(".")
    if parts[0] == "layers":
        return len(parts) == 4 and parts[1].isdigit() and parts[2] in LAYER and parts[3] in (W, B)
    return len(parts) == 2 and parts[0] in TOP and parts[1] in (W, B)


def role(full: str) -> str:
    """The sharding role of a full parameter name ("replicated" if none). Leaves below a weight
    (``qkv.w.q`` / ``qkv.w.scale`` of a quantized weight) share its role."""
    parts = full.split(".")
    if parts[0] == "layers":
        parts = parts[2:]
    return ROLES.get(".".join(parts[:2]), "replicated")
