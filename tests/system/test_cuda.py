"""The ``cuda`` backend against Hugging Face transformers (reference on the CPU), every family.

Runs only where jax has a CUDA plugin and an NVIDIA driver is present; everywhere else (CI) the
module skips. Same bar as the conformance suite: greedy tokens identical on a left-padded batch of
three, last-token logits within 1e-4 * max|logit| (f32 programs run their matmuls at "highest"
precision, so no TF32). Plus a compiled-artifact round trip on the GPU.
"""

from __future__ import annotations

import importlib.metadata
import shutil

import pytest
import torch

import nx
from tests.cases import all_cases
from tests.conftest import assert_close_logits, assert_same_greedy, left_padded


def _cuda_available() -> bool:
    """Decided without starting jax's backends (the other test modules configure them first)."""
    plugin = any((d.metadata["Name"] or "").lower().startswith("jax-cuda") for d in importlib.metadata.distributions())
    return plugin and shutil.which("nvidia-smi") is not None


pytestmark = pytest.mark.skipif(not _cuda_available(), reason="no CUDA GPU (jax-cuda plugin + NVIDIA driver)")

BUCKETS = dict(n_positions=[32, 64], context_length_estimate=[8, 16])


@pytest.fixture(scope="module")
def cuda_model(saved_case):
    cache = {}

    def get(case, batch_size: int):
        if (case.id, batch_size) not in cache:
            hf, path = saved_case(case)
            cache[case.id, batch_size] = hf, nx.load(
                case.family, path, batch_size=batch_size, backend="cuda", progress=False, **BUCKETS
            )
        return cache[case.id, batch_size]

    return get


@pytest.mark.parametrize("case", all_cases(), ids=str)
def test_cuda_greedy_and_logits_match_hf(case, cuda_model):
    hf, model = cuda_model(case, 3)
    assert model.device.platform == "gpu"
    ids, mask = left_padded([16, 9, 3], case.vocab, seed=3)
    assert_same_greedy(hf, model, ids, mask, 40)
    assert_close_logits(hf, model, ids, mask)


def test_cuda_artifact_round_trip(saved_case, tmp_path):
    case = next(c for c in all_cases() if c.family == "llama")
    _, path = saved_case(case)
    model = nx.load("llama", path, batch_size=1, backend="cuda", progress=False, **BUCKETS)
    ids = torch.randint(3, case.vocab, (1, 12), generator=torch.Generator().manual_seed(0))
    before = model.generate(ids, max_new_tokens=12, eos_token_id=[])
    model.save(tmp_path / "art")
    loaded = nx.load(tmp_path / "art")
    assert loaded.config.backend == "cuda"
    assert torch.equal(loaded.generate(ids, max_new_tokens=12, eos_token_id=[]), before)


def test_cuda_multi_step_decode_matches_hf(saved_case):
    """k decode steps a program call (a device-side loop) give HF's greedy tokens on the GPU too,
    on a left-padded batch (rows end their blocks at different slots)."""
    case = next(c for c in all_cases() if c.family == "llama")
    hf, path = saved_case(case)
    model = nx.load("llama", path, batch_size=3, backend="cuda", progress=False, decode_steps=4, **BUCKETS)
    ids, mask = left_padded([16, 9, 3], case.vocab, seed=3)
    assert_same_greedy(hf, model, ids, mask, 40)
