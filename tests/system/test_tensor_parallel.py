"""Tensor parallelism beyond the per-family parity in test_conformance: real collectives in the
compiled HLO, vocabulary padding, device selection, memory checks, and two processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

import nx
from tests.cases import Case
from tests.cases.bloom import CASES as BLOOM_CASES
from tests.cases.llama import CASES, _llama
from tests.conftest import char_tokenizer, left_padded

CASE = CASES[0]
BUCKETS = dict(n_positions=[32, 64], context_length_estimate=[16])


def test_compiled_decode_program_contains_all_reduce(saved_case):
    _, path = saved_case(CASE)
    model = nx.load("llama", path, tp_degree=2, compile=False, progress=False, **BUCKETS)
    hlo = model.lower(1, 1, 32).compile().as_text()
    assert hlo.count("all-reduce") >= 2 * model.spec.n_layers  # after attention and MLP of each layer
    assert "all-gather" in hlo  # vocabulary-sharded logits
    one = nx.load("llama", path, tp_degree=1, compile=False, progress=False, **BUCKETS)
    assert "all-reduce" not in one.lower(1, 1, 32).compile().as_text()


def test_weights_and_cache_are_sharded(saved_case):
    _, path = saved_case(CASE)
    model = nx.load("llama", path, tp_degree=2, compile=False, progress=False, **BUCKETS)
    qkv = model.params["layers"][0]["qkv"]["w"]
    assert len(qkv.addressable_shards) == 2
    assert qkv.addressable_shards[0].data.shape == (model.spec.qkv_dim // 2, 64)  # [out, in]: outputs split
    down = model.params["layers"][0]["down"]["w"]
    assert down.addressable_shards[0].data.shape == (64, model.spec.intermediate_size // 2)  # inputs split
    k_cache, v_cache = model.caches[0]  # [kv_heads * batch, ...]: whole kv heads per shard
    assert k_cache.addressable_shards[0].data.shape == (model.spec.kv_heads // 2, model.spec.head_dim, 64)
    assert v_cache.addressable_shards[0].data.shape == (model.spec.kv_heads // 2, 64, model.spec.head_dim)


def test_bf16_tokens_do_not_depend_on_the_tp_degree(saved_case):
    """Row-parallel partial products are summed in f32 and rounded to bf16 once, as one device's
    product is: here tp 2 gives tp 1's greedy tokens (82% of them when each part was rounded first;
    only the f32 summation order still differs)."""
    _, path = saved_case(CASE)
    ids = np.random.default_rng(1).integers(1, 200, (2, 9))
    outs = [
        nx.load("llama", path, batch_size=2, amp="bf16", tp_degree=tp, progress=False, **BUCKETS)
        .generate(ids, max_new_tokens=30, min_new_tokens=30)
        for tp in (1, 2)
    ]
    assert torch.equal(outs[0], outs[1])


def test_vocabulary_not_divisible_by_tp_is_padded(tmp_path):
    torch.manual_seed(5)
    hf = GPT2LMHeadModel(GPT2Config(vocab_size=250, n_embd=64, n_layer=2, n_head=4, n_positions=64,
                                    initializer_range=0.2, bos_token_id=0, eos_token_id=0)).eval()
    hf.save_pretrained(tmp_path)
    ids, mask = left_padded([9, 5], 250, seed=4)
    ref = nx.load("gpt2", tmp_path, batch_size=2, progress=False, **BUCKETS)
    tp4 = nx.load("gpt2", tmp_path, batch_size=2, tp_degree=4, progress=False, **BUCKETS)
    assert tp4.logits(ids, mask).shape == (2, 250)
    np.testing.assert_allclose(tp4.logits(ids, mask), ref.logits(ids, mask), atol=1e-4)
    a = ref.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[])
    assert torch.equal(a, tp4.generate(ids, attention_mask=mask, max_new_tokens=20, eos_token_id=[]))


def test_models_side_by_side_on_disjoint_devices(saved_case):
    _, path = saved_case(CASE)
    a = nx.load("llama", path, tp_degree=2, devices=[0, 1], progress=False, **BUCKETS)
    b = nx.load("llama", path, tp_degree=2, devices=[2, 3], progress=False, **BUCKETS)
    assert {d.id for d in a.mesh.devices.flat} == {0, 1} and {d.id for d in b.mesh.devices.flat} == {2, 3}
    assert {d.id for d in b.params["layers"][0]["qkv"]["w"].devices()} == {2, 3}
    ids, _ = left_padded([6], CASE.vocab, seed=9)
    assert torch.equal(a.generate(ids, max_new_tokens=8), b.generate(ids, max_new_tokens=8))


@pytest.mark.parametrize(
    "kw, match",
    [
        (dict(tp_degree=0), "tp_degree must be a positive int"),
        (dict(tp_degree=2, devices=[0]), "must name tp_degree=2 distinct device ids"),
        (dict(tp_degree=1, devices=[9]), r"devices \[9\] do not exist"),
    ],
)
def test_bad_tp_options(saved_case, kw, match):
    _, path = saved_case(CASE)
    with pytest.raises(nx.ConfigError, match=match):
        nx.load("llama", path, compile=False, progress=False, **BUCKETS, **kw)


def test_more_devices_than_exist(saved_case):
    case = Case("llama", "llama-8heads", _llama(num_attention_heads=8, num_key_value_heads=8))
    _, path = saved_case(case)
    with pytest.raises(nx.ConfigError, match=r"needs 8 cpu devices but only 4 exist.*JAX_NUM_CPU_DEVICES=8"):
        nx.load("llama", path, tp_degree=8, compile=False, progress=False, **BUCKETS)


def test_heads_not_divisible_name_valid_degrees(saved_case):
    case = next(c for c in BLOOM_CASES if c.id == "bloom-6heads")
    _, path = saved_case(case)
    with pytest.raises(nx.ConfigError, match=r"6 attention heads.*Valid tp degrees: \[1, 2, 3, 6\]"):
        nx.load("bloom", path, tp_degree=4, compile=False, progress=False, **BUCKETS)


def test_memory_check_fails_early_with_numbers_and_a_suggestion(saved_case):
    _, path = saved_case(CASE)
    model = nx.load("llama", path, compile=False, progress=False, **BUCKETS)
    total = sum(a.nbytes for a in jax.tree.leaves(model.params)) + sum(
        c.nbytes for kv in model.caches for c in kv
    )
    with pytest.raises(nx.ResourceError, match=r"needs .* GiB \(weights .* KV cache .*\).*use tp_degree=2"):
        nx.load("llama", path, device_memory=int(total * 0.6), compile=False, progress=False, **BUCKETS)
    with pytest.raises(nx.ResourceError, match="no tp degree fits"):
        nx.load("llama", path, device_memory=total // 100, compile=False, progress=False, **BUCKETS)
    nx.load("llama", path, tp_degree=2, device_memory=int(total * 0.6), compile=False, progress=False, **BUCKETS)


def test_cpu_devices_are_created_automatically(saved_case):
    """In a fresh process nx makes the host devices tp needs; no XLA flags by hand."""
    _, path = saved_case(CASE)
    code = (
        "import jax, nx\n"
        f"m = nx.load('llama', {path!r}, tp_degree=2, compile=False, progress=False, n_positions=32)\n"
        "print(len(jax.devices()), len(m.mesh.devices.flat))\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES", "XLA_FLAGS")}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[-2:] == ["2", "2"]


def test_two_processes_agree_with_one(saved_case, tmp_path):
    """The same model over 2 processes (jax.distributed, gloo on CPU) prints the same greedy text."""
    _, path = saved_case(CASE)
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    char_tokenizer().save_pretrained(tmp_path)
    args = ["generate", "llama", str(tmp_path), "-p", "Hello there", "-n", "16", "--n-positions", "64",
            "--context-length-estimate", "32"]
    cache = tmp_path / "compile-cache"
    env = {k: v for k, v in os.environ.items() if k not in ("JAX_NUM_CPU_DEVICES",)} | {"NX_CACHE_DIR": str(cache)}

    def run(*extra):
        return subprocess.run([sys.executable, "-m", "nx.cli", *args, *extra], capture_output=True, text=True,
                              env=env, timeout=400)

    one = run()
    stored = sorted((cache / "programs").iterdir())
    two = run("--tp", "2", "--num-processes", "2")
    assert one.returncode == 0, one.stderr[-2000:]
    assert two.returncode == 0, two.stderr[-3000:]
    assert stored and sorted((cache / "programs").iterdir()) == stored  # multi-process programs are not cached
    text = "".join(line for line in two.stdout.splitlines(keepends=True) if not line.startswith("[Gloo]"))
    assert text == one.stdout and one.stdout.strip()
