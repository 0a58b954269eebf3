"""CPU programs run inline when nx starts jax (`nx.loader.ensure_cpu_devices`): in a fresh process
`nx.load` turns jax's async CPU dispatch off unless the user's environment says otherwise, and the
greedy tokens equal HF's either way (batches with different prompt lengths)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from tests.cases.llama import CASES
from tests.conftest import hf_greedy, left_padded

CASE = CASES[0]

CHILD = """
import json, sys
import numpy as np
import nx
from jax._src import xla_bridge
ids, mask = np.asarray(json.loads(sys.argv[2])), np.asarray(json.loads(sys.argv[3]))
model = nx.load(sys.argv[1], batch_size=ids.shape[0], n_positions=[32], progress=False)
out = model.generate(ids, attention_mask=mask, max_new_tokens=8, eos_token_id=[])
print(json.dumps({"async": bool(xla_bridge._CPU_ENABLE_ASYNC_DISPATCH.value), "tokens": np.asarray(out).tolist()}))
"""


@pytest.mark.parametrize("env", [None, "true"], ids=["default", "user-set"])
def test_fresh_process_runs_cpu_programs_inline_unless_told_and_matches_hf(saved_case, env):
    hf, path = saved_case(CASE)
    ids, mask = left_padded([5, 9], CASE.vocab, seed=3)
    child_env = {k: v for k, v in os.environ.items() if k != "JAX_CPU_ENABLE_ASYNC_DISPATCH"}
    if env is not None:
        child_env["JAX_CPU_ENABLE_ASYNC_DISPATCH"] = env
    res = subprocess.run([sys.executable, "-c", CHILD, path, json.dumps(ids.tolist()), json.dumps(mask.tolist())],
                         capture_output=True, text=True, env=child_env, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["async"] is (env == "true")
    assert got["tokens"] == hf_greedy(hf, ids, mask, 8).tolist()
