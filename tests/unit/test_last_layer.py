"""A prompt's last layer computes queries, attention output and MLP for one token only (the one
whose logits are returned); its keys and values still reach the cache for every token."""

from __future__ import annotations

import nx
from nx import decoder
from nx.ops import cpu_kernels
from tests.cases.llama import CASES


def test_prefill_last_layer_runs_one_token(saved_case, monkeypatch):
    _, path = saved_case(CASES[0])
    tokens = 16
    # XLA's cost analysis counts its own dots only: the CPU kernels' custom calls (which take prompt
    # chunks of up to 64 f32 rows) would hide the work either way, so the XLA path is measured
    monkeypatch.setenv(cpu_kernels.ENV, "off")

    model = nx.load("llama", path, n_positions=[32], context_length_estimate=[tokens], compile=False, progress=False)

    def flops() -> float:
        cost = model.lower(1, tokens, 32).cost_analysis()
        return (cost if isinstance(cost, dict) else cost[0])["flops"]

    pruned = flops()
    full_layer = decoder.layer  # the control: every layer computes every token
    monkeypatch.setattr(decoder, "layer", lambda spec, p, x, cache, ctx, only=None: full_layer(spec, p, x, cache, ctx))
    full = flops()
    spec = model.spec
    # the q and o projections and the gated MLP, 2 flops per weight, for the tokens left out
    per_token = 2 * (2 * spec.hidden_size * spec.n_heads * spec.head_dim + 3 * spec.hidden_size * spec.intermediate_size)
    assert full - pruned >= (tokens - 1) * per_token
