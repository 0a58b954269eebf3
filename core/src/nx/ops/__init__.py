"""Shared block builders: pure jax functions over fixed-shape arrays, reused by every family."""

from nx.ops.activations import activation
from nx.ops.alibi import alibi_slopes
from nx.ops.attention import (
    attend,
    attend_cache,
    cache_dtype,
    cache_row,
    cache_shapes,
    cache_windows,
    causal_padding_mask,
    update_caches,
)
from nx.ops.embedding import embed, logits
from nx.ops.linear import gated_linear, linear, lm_head, row_parallel_linear
from nx.ops.mlp import mlp
from nx.ops.norms import layer_norm, norm, rms_norm
from nx.ops.rotary import apply_rotary, rope_inv_freq, rotary_tables

__all__ = [
    "activation",
    "alibi_slopes",
    "apply_rotary",
    "attend",
    "attend_cache",
    "cache_dtype",
    "cache_row",
    "cache_shapes",
    "cache_windows",
    "causal_padding_mask",
    "embed",
    "gated_linear",
    "logits",
    "layer_norm",
    "linear",
    "lm_head",
    "mlp",
    "norm",
    "rms_norm",
    "rope_inv_freq",
    "rotary_tables",
    "row_parallel_linear",
    "update_caches",
]
