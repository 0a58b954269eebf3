"""Rotary position embeddings: half-split (LLaMA, NeoX) and interleaved (GPT-J) styles,
partial rotation of the leading `rotary_dim` dims, and llama3 / linear frequency scaling."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from nx.spec import RopeSpec


def rope_inv_freq(rope: RopeSpec) -> np.ndarray:
    """Inverse frequencies ``[rotary_dim // 2]`` (f32), with HF's rope scaling rules applied."""
    dim = rope.rotary_dim
    inv = 1.0 / (rope.theta ** (np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim))
    inv = inv.astype(np.float32)
    sc = rope.scaling_dict
    kind = sc.get("rope_type", sc.get("type", "default"))
    if kind == "linear":
        inv = inv / float(sc["factor"])
    elif kind == "llama3":
        factor = float(sc["factor"])
        low, high = float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_len = float(sc["original_max_position_embeddings"])
        low_wavelen, high_wavelen = old_len / low, old_len / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (old_len / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled).astype(np.float32)
    return inv


TABLE_BYTES = 4 << 20  # largest (cos, sin) table pair a program embeds; longer windows compute them


def rotary_tables(positions: jnp.ndarray, rope: RopeSpec, n_positions: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """``(cos, sin)`` of the rotary angles of `positions` (all below `n_positions`), ``[batch,
    tokens, rotary_dim // 2]`` f32. Read from host-computed tables embedded in the program when
    they are small: XLA:CPU fuses sin and cos computed in the program into every layer's q and k
    rotation (11 of 155 ms of SmolLM2's 128-token prefill)."""
    inv = rope_inv_freq(rope)
    if n_positions * inv.size * 8 > TABLE_BYTES:
        angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)
        return jnp.cos(angles), jnp.sin(angles)
    angles = np.arange(n_positions, dtype=np.float32)[:, None] * inv[None, :]
    return tuple(jnp.take(jnp.asarray(f(angles)), positions, axis=0) for f in (np.cos, np.sin))


def apply_rotary(x: jnp.ndarray, tables: tuple[jnp.ndarray, jnp.ndarray], rope: RopeSpec) -> jnp.ndarray:
    """Rotate ``x [batch, tokens, heads, head_dim]`` by the angles of `rotary_tables`."""
    cos, sin = (t[:, :, None, :] for t in tables)
    rd = rope.rotary_dim
    xr, rest = x[..., :rd].astype(jnp.float32), x[..., rd:]
    if rope.style == "interleaved":
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        out = jnp.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).reshape(xr.shape)
    else:
        x1, x2 = xr[..., : rd // 2], xr[..., rd // 2 :]
        out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    out = out.astype(x.dtype)
    return out if rd == x.shape[-1] else jnp.concatenate([out, rest], axis=-1)
