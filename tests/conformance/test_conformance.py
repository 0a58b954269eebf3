"""The family conformance suite: every registered family against Hugging Face transformers.

Tolerance: nx and HF both compute in f32 but sum in different orders, so last-token logits may
differ by float rounding; we require |nx - hf| <= 1e-4 * max(1, max|hf|) (`LOGIT_RTOL` in
tests/conftest.py; measured: ~1e-6 relative). Greedy tokens must be identical.
"""

from __future__ import annotations

import pytest

import nx
from nx.registry import families
from tests.cases import Case, all_cases
from tests.conftest import assert_close_logits, assert_same_greedy, left_padded

CASES = all_cases()
NEW_TOKENS = 28

# context buckets 8/16, position buckets 32/64: prompts sit at and across bucket edges and
# generation crosses from the 32 into the 64 position bucket.
BUCKETS = dict(n_positions=[32, 64], context_length_estimate=[8, 16])


def test_every_family_has_conformance_cases():
    covered = {c.family for c in CASES}
    missing = set(families()) - covered
    assert not missing, f"families without conformance cases in tests/cases/: {missing}"


@pytest.fixture(scope="module")
def loaded(saved_case):
    cache = {}

    def get(case: Case, batch_size: int, fmt: str = "safetensors"):
        key = (case.id, batch_size, fmt)
        if key not in cache:
            hf, path = saved_case(case, fmt)
            cache[key] = (hf, nx.load(case.family, path, batch_size=batch_size, progress=False, **BUCKETS))
        return cache[key]

    return get


@pytest.mark.parametrize("case", CASES, ids=str)
@pytest.mark.parametrize("length", [5, 8, 16, 21], ids=lambda n: f"prompt{n}")
def test_greedy_batch1(case, length, loaded):
    """Prompt inside, exactly at (8, 16) and beyond the largest context bucket (21: encoded in
    chunks of 16 + 8); decode crosses the 32 -> 64 position bucket edge."""
    hf, model = loaded(case, 1)
    ids, mask = left_padded([length], case.vocab, seed=length)
    assert_same_greedy(hf, model, ids, mask, NEW_TOKENS)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_greedy_batch3_left_padded(case, loaded):
    hf, model = loaded(case, 3)
    ids, mask = left_padded([16, 9, 3], case.vocab, seed=3)
    assert_same_greedy(hf, model, ids, mask, 40)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_last_token_logits(case, loaded):
    hf, model = loaded(case, 3)
    ids, mask = left_padded([11, 4, 7], case.vocab, seed=7)
    assert_close_logits(hf, model, ids, mask)


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
@pytest.mark.parametrize("case", [c for c in CASES if c.id == c.family or c.id.endswith("-default")] or CASES, ids=str)
def test_checkpoint_formats(case, fmt, saved_case):
    """Sharded safetensors (with index) and pytorch_model.bin load to the same model."""
    hf, path = saved_case(case, fmt)
    model = nx.load(case.family, path, batch_size=1, progress=False, compile=False, **BUCKETS)
    ids, mask = left_padded([6], case.vocab, seed=1)
    assert_close_logits(hf, model, ids, mask)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_wrong_family_is_rejected(case, saved_case):
    _, path = saved_case(case)
    other = next(f for f in sorted(families()) if f != case.family)
    with pytest.raises(nx.CheckpointError, match=f"family '{other}' accepts"):
        nx.load(other, path, compile=False, progress=False)


@pytest.mark.parametrize("case", CASES, ids=str)
def test_missing_keys_are_reported(case, saved_case, tmp_path):
    from safetensors.torch import load_file, save_file

    _, path = saved_case(case)
    import shutil

    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    state = load_file(f"{tmp_path}/model.safetensors")
    dropped = sorted(state)[len(state) // 2]
    del state[dropped]
    save_file(state, f"{tmp_path}/model.safetensors")
    with pytest.raises(nx.WeightKeyError, match="missing") as err:
        nx.load(case.family, tmp_path, compile=False, progress=False, **BUCKETS)
    assert dropped in str(err.value)


FIRST_OF_FAMILY = {c.family: c for c in reversed(CASES)}


def _tp_model(case, path, tp, batch_size):
    return nx.load(case.family, path, batch_size=batch_size, tp_degree=tp, progress=False, **BUCKETS)


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("case", CASES, ids=str)
def test_tensor_parallel_matches_reference(case, tp, saved_case):
    """Weights and KV cache sharded over `tp` host devices: greedy tokens identical to HF (and so
    to tp=1) and logits within tolerance, batch 3 with left padding. Degrees the model's head
    counts do not allow must fail with the list of valid ones."""
    hf, path = saved_case(case)
    from nx.sharding import valid_degrees

    spec = nx.registry.get_family(case.family).spec_from_config(hf.config)
    if tp not in valid_degrees(spec):
        with pytest.raises(nx.ConfigError, match=r"Valid tp degrees: \[1, "):
            _tp_model(case, path, tp, 3)
        return
    model = _tp_model(case, path, tp, 3)
    ids, mask = left_padded([16, 9, 3], case.vocab, seed=3)
    assert_same_greedy(hf, model, ids, mask, 30)
    ids, mask = left_padded([11, 4, 7], case.vocab, seed=7)
    assert_close_logits(hf, model, ids, mask)


@pytest.mark.parametrize("case", list(FIRST_OF_FAMILY.values()), ids=str)
def test_tensor_parallel_batch1_long_prompt(case, saved_case):
    hf, path = saved_case(case)
    model = _tp_model(case, path, 2, 1)
    ids, mask = left_padded([21], case.vocab, seed=21)
    assert_same_greedy(hf, model, ids, mask, NEW_TOKENS)


@pytest.mark.parametrize("case", list(FIRST_OF_FAMILY.values()), ids=str)
def test_base_model_checkpoint_without_prefix(case, saved_case, tmp_path):
    """Checkpoints saved from the bare base model (keys without ``transformer.``/``model.``, as many
    hub originals are) load too; for tied heads the logits match the full HF model."""
    hf, _ = saved_case(case)
    hf.base_model.save_pretrained(tmp_path)
    fam = nx.registry.get_family(case.family)
    from safetensors import safe_open

    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        assert not any(k.startswith(fam.base_prefix) for k in f.keys())  # noqa: SIM118
    if not hf.config.tie_word_embeddings:
        with pytest.raises(nx.WeightKeyError, match="missing"):
            nx.load(case.family, tmp_path, compile=False, progress=False, **BUCKETS)
        return
    model = nx.load(case.family, tmp_path, batch_size=1, compile=False, progress=False, **BUCKETS)
    ids, mask = left_padded([7], case.vocab, seed=2)
    assert_close_logits(hf, model, ids, mask)
