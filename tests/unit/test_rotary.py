"""Rotary embeddings: the host tables a program embeds agree with the angles computed in the program
(the path windows too long for a table take), the rotation matches HF's for the same inputs, and
compiled programs compute no sin/cos."""

from __future__ import annotations

import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

import nx
from nx.ops import rotary
from nx.spec import RopeSpec
from tests.cases.llama import CASES

LLAMA3 = (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
          ("original_max_position_embeddings", 64), ("rope_type", "llama3"))


@pytest.mark.parametrize("rope", [RopeSpec(10000.0, 64), RopeSpec(500000.0, 32, "half", LLAMA3)])
def test_embedded_tables_match_computed_angles(rope, monkeypatch):
    positions = jnp.asarray([[0, 1, 2, 200], [7, 0, 511, 3]], jnp.int32)
    embedded = rotary.rotary_tables(positions, rope, 512)
    monkeypatch.setattr(rotary, "TABLE_BYTES", 0)  # as for a window too long to embed
    computed = rotary.rotary_tables(positions, rope, 512)
    angles = np.asarray(positions, np.float64)[..., None] * rotary.rope_inv_freq(rope).astype(np.float64)
    for got, want, exact in zip(embedded, computed, (np.cos(angles), np.sin(angles))):
        assert got.shape == (2, 4, rope.rotary_dim // 2)
        np.testing.assert_allclose(np.asarray(got), exact, atol=2e-5)
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=2e-5)


def test_half_rotation_matches_hf():
    rope = RopeSpec(10000.0, 16)
    rng = np.random.default_rng(0)
    q = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)  # [batch, tokens, heads, head_dim]
    positions = jnp.asarray([[0, 1, 2, 3, 4], [9, 10, 11, 12, 13]], jnp.int32)
    tables = rotary.rotary_tables(positions, rope, 16)
    got = rotary.apply_rotary(jnp.asarray(q), tables, rope)

    cos, sin = (np.asarray(t) for t in tables)
    cos, sin = (torch.from_numpy(np.concatenate([t, t], axis=-1)) for t in (cos, sin))
    qt = torch.from_numpy(q).transpose(1, 2)  # HF: [batch, heads, tokens, head_dim]
    want, _ = apply_rotary_pos_emb(qt, qt, cos, sin)
    np.testing.assert_allclose(np.asarray(got), want.transpose(1, 2).numpy(), atol=1e-6)


def test_programs_compute_no_trigonometry(saved_case, monkeypatch):
    """XLA:CPU fused in-program sin/cos into every layer's rotation; with embedded tables a program
    has none (the control: forcing the computed path puts them back)."""
    _, path = saved_case(CASES[0])

    def trig_ops() -> int:
        model = nx.load("llama", path, n_positions=[32], context_length_estimate=[16], compile=False, progress=False)
        hlo = model.lower(1, 16, 32).compile().as_text()
        return len(re.findall(r" (?:cosine|sine)\(", hlo))

    assert trig_ops() == 0
    monkeypatch.setattr(rotary, "TABLE_BYTES", 0)
    assert trig_ops() > 0
