"""The on-disk compile cache (`nx.compile_cache`): a second load of the same model compiles
nothing and still generates HF's tokens; stale, damaged, unsafe and full caches are handled."""

from __future__ import annotations

import hashlib
import os
import warnings

import jax
import pytest
from click.testing import CliRunner
from jax import monitoring

import nx
from nx import compile_cache, xla_options
from nx.buckets import ProgramKey
from nx.cli import main
from nx.compile_cache import CompileCache, default_directory
from nx.programs import ProgramSet
from tests.cases.llama import CASES
from tests.conftest import assert_same_greedy, left_padded

CASE = CASES[0]
OPTS = dict(batch_size=2, n_positions=[32, 64], context_length_estimate=[16], decode_steps=1, progress=False)
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture
def compiles():
    """The names of the programs XLA compiles while the test runs."""
    seen: list[str] = []

    def listen(event, secs, **kw):
        if event == COMPILE_EVENT:
            seen.append(kw.get("fun_name"))

    monitoring.register_event_duration_secs_listener(listen)
    yield seen
    monitoring.unregister_event_duration_listener(listen)


def _programs(seen: list[str]) -> list[str]:
    return [n for n in seen if n and n.startswith("jit(nx_")]  # nx programs are named after their key


def test_second_load_compiles_nothing_and_matches_hf(saved_case, tmp_path, compiles):
    hf, path = saved_case(CASE)
    first = nx.load("llama", path, compile_cache=tmp_path, **OPTS)
    n = len(first.program_shapes())
    assert first.compile_cache.misses == n and first.compile_cache.hits == 0
    assert len(first.compile_cache.entries()) == n
    assert len(_programs(compiles)) == n
    compiles.clear()

    second = nx.load("llama", path, compile_cache=tmp_path, **OPTS)
    assert second.compile_cache.hits == n and second.compile_cache.misses == 0
    assert _programs(compiles) == []  # every program came from the cache
    ids, mask = left_padded([7, 4], CASE.vocab, seed=21)
    assert_same_greedy(hf, second, ids, mask, 20)


def test_dropped_programs_come_back_from_the_cache(saved_case, tmp_path, compiles):
    """`drop_programs()` frees every program; the next generate rebuilds what it runs from the
    compile cache (no XLA compile) and gives the same tokens."""
    _, path = saved_case(CASE)
    model = nx.load("llama", path, compile_cache=tmp_path, **OPTS)
    ids, mask = left_padded([7, 4], CASE.vocab, seed=21)
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    model.drop_programs()
    assert model.compiled_shapes == []
    compiles.clear()
    hits = model.compile_cache.hits
    out = model.generate(ids, attention_mask=mask, max_new_tokens=12, eos_token_id=[])
    assert out.tolist() == ref.tolist()
    assert _programs(compiles) == [] and model.compile_cache.hits - hits == len(model.compiled_shapes) > 0


def test_other_buckets_options_or_flags_are_new_entries(saved_case, tmp_path, monkeypatch):
    _, path = saved_case(CASE)
    a = nx.load("llama", path, compile_cache=tmp_path, **OPTS)
    b = nx.load("llama", path, compile_cache=tmp_path, **{**OPTS, "context_length_estimate": [8, 16]})
    shared = set(a.program_shapes()) & set(b.program_shapes())
    assert b.compile_cache.hits == len(shared) > 0  # decode and 16-token prompt programs are the same
    assert b.compile_cache.misses == len(set(b.program_shapes()) - shared) == 1  # the 8-token prompt
    c = nx.load("llama", path, compile_cache=tmp_path, **{**OPTS, "n_positions": [32, 128]})
    assert c.compile_cache.hits == 0  # a longer KV cache changes every program's arguments

    key = ProgramKey(2, 1, 32, False)
    options = xla_options.compiler_options("cpu")

    def entry(k=key, opts=options):
        return a.compile_cache.key(a.programs.cache_key(k, opts), a.placement.devices)

    base = entry()
    assert entry(opts={**options, "xla_cpu_prefer_vector_width": 256}) != base
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_enable_fast_math=false")
    assert entry() != base
    monkeypatch.delenv("XLA_FLAGS")
    monkeypatch.setenv("NX_SOME_SETTING", "1")  # nx's own switches may change programs
    assert entry() != base
    monkeypatch.delenv("NX_SOME_SETTING")
    effort = jax.config.jax_exec_time_optimization_effort  # jax copies it into the compile options
    jax.config.update("jax_exec_time_optimization_effort", 0.5)
    try:
        assert entry() != base
    finally:
        jax.config.update("jax_exec_time_optimization_effort", effort)
    assert entry(ProgramKey(2, 1, 64, False)) != base
    assert entry() == base  # deterministic


def test_keys_follow_nx_source_and_need_no_lowering(saved_case, tmp_path, monkeypatch):
    """A cache hit traces nothing (keys come from shapes), and an edit to nx's code is a new key."""
    _, path = saved_case(CASE)
    a = nx.load("llama", path, compile_cache=tmp_path, **OPTS)
    key = ProgramKey(2, 1, 32, False)
    a.drop_programs()
    lowered = []
    real = ProgramSet.lower
    monkeypatch.setattr(ProgramSet, "lower", lambda self, k: lowered.append(k) or real(self, k))
    a.programs.get(key)
    assert lowered == [] and a.compile_cache.hits >= 1
    base = a.compile_cache.key(a.programs.cache_key(key, {}), a.placement.devices)
    monkeypatch.setattr(compile_cache, "source_digest", lambda: "an edited nx")
    assert a.compile_cache.key(a.programs.cache_key(key, {}), a.placement.devices) != base


@pytest.mark.parametrize("damage", ["flip", "truncate", "empty"])
def test_damaged_entries_are_compiled_again(saved_case, tmp_path, damage, compiles):
    hf, path = saved_case(CASE)
    nx.load("llama", path, compile_cache=tmp_path, **OPTS)
    victim = CompileCache(tmp_path).entries()[0]
    data = victim.read_bytes()
    if damage == "flip":
        i = len(data) // 2
        data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
    victim.write_bytes(data[: len(data) // 3] if damage == "truncate" else b"" if damage == "empty" else data)
    compiles.clear()
    model = nx.load("llama", path, compile_cache=tmp_path, **OPTS)
    assert model.compile_cache.misses == 1 and len(_programs(compiles)) == 1
    assert victim.is_file() and victim.read_bytes() != data  # rewritten whole
    ids, mask = left_padded([7, 4], CASE.vocab, seed=22)
    assert_same_greedy(hf, model, ids, mask, 12)


def test_a_planted_entry_with_a_valid_checksum_runs_no_code_and_is_compiled_again(saved_case, tmp_path, compiles):
    from tests.system.test_artifacts import payloads

    hf, path = saved_case(CASE)
    cache_dir, marker = tmp_path / "cache", tmp_path / "MARKER"
    nx.load("llama", path, compile_cache=cache_dir, **OPTS)
    entries = CompileCache(cache_dir).entries()
    for victim, payload in zip(entries, payloads(marker).values()):
        victim.write_bytes(compile_cache._MAGIC + hashlib.sha256(payload).hexdigest().encode() + payload)
    compiles.clear()
    model = nx.load("llama", path, compile_cache=cache_dir, **OPTS)
    assert not marker.exists()
    planted = min(len(entries), len(payloads(marker)))
    assert model.compile_cache.misses == planted and len(_programs(compiles)) == planted
    ids, mask = left_padded([7, 4], CASE.vocab, seed=22)
    assert_same_greedy(hf, model, ids, mask, 12)


def test_swapped_entries_are_refused_and_compiled_again(saved_case, tmp_path, compiles):
    """An entry holding another program (checksum and all) fails `ProgramSet.check`: never run."""
    hf, path = saved_case(CASE)
    nx.load("llama", path, compile_cache=tmp_path, **OPTS)
    a, b = CompileCache(tmp_path).entries()[:2]
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)
    compiles.clear()
    model = nx.load("llama", path, compile_cache=tmp_path, **OPTS)
    assert model.compile_cache.misses == 2 and len(_programs(compiles)) == 2
    ids, mask = left_padded([7, 4], CASE.vocab, seed=22)
    assert_same_greedy(hf, model, ids, mask, 12)


def test_disabled_cache_writes_nothing(saved_case, tmp_path, monkeypatch):
    _, path = saved_case(CASE)
    model = nx.load("llama", path, compile_cache=False, **OPTS)
    assert model.compile_cache is None
    monkeypatch.setenv("NX_CACHE_DIR", "off")
    assert default_directory() is None and CompileCache.from_setting(True) is None
    model = nx.load("llama", path, **OPTS)
    assert model.compile_cache is None
    monkeypatch.setenv("NX_CACHE_DIR", str(tmp_path / "env"))
    assert nx.load("llama", path, compile=False, **OPTS).compile_cache.directory == tmp_path / "env"
    monkeypatch.delenv("NX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_directory() == tmp_path / "xdg" / "nx"
    monkeypatch.setenv("NX_CACHE_MAX_MB", "512")
    assert CompileCache(tmp_path).max_bytes == 512 * 2**20
    monkeypatch.setenv("NX_CACHE_MAX_MB", "lots")
    with pytest.raises(nx.ConfigError, match="NX_CACHE_MAX_MB='lots' is not a size"):
        nx.load("llama", path, compile=False, **OPTS)


@pytest.mark.skipif(not hasattr(os, "getuid"), reason="POSIX permissions")
def test_a_directory_others_can_write_is_not_used(saved_case, tmp_path):
    hf, path = saved_case(CASE)
    shared = tmp_path / "shared"
    (shared / "programs").mkdir(parents=True)
    os.chmod(shared / "programs", 0o777)
    with pytest.warns(RuntimeWarning, match="other users can write"):
        model = nx.load("llama", path, compile_cache=shared, **OPTS)
    assert list((shared / "programs").iterdir()) == []
    assert model.compile_cache.hits == model.compile_cache.misses == 0
    ids, mask = left_padded([7, 4], CASE.vocab, seed=23)
    assert_same_greedy(hf, model, ids, mask, 8)


def test_the_least_recently_used_entries_go_beyond_the_limit(saved_case, tmp_path):
    _, path = saved_case(CASE)
    model = nx.load("llama", path, compile_cache=tmp_path, **OPTS)
    entries = model.compile_cache.entries()
    sizes = [f.stat().st_size for f in entries]
    assert len(entries) == len(model.program_shapes())
    newest = entries[-1]
    os.utime(entries[0])  # used last: kept
    small = CompileCache(tmp_path, max_bytes=sizes[0] + max(sizes) + 1)
    small.prune()
    left = small.entries()
    assert entries[0] in left and newest in left and small.size_bytes() <= small.max_bytes
    assert len(left) == 2


def test_programs_from_the_cache_save_as_an_artifact(saved_case, tmp_path):
    hf, path = saved_case(CASE)
    nx.load("llama", path, compile_cache=tmp_path / "cache", **OPTS)
    model = nx.load("llama", path, compile_cache=tmp_path / "cache", **OPTS)
    assert model.compile_cache.misses == 0
    model.save(tmp_path / "art")
    restored = nx.load(tmp_path / "art")
    ids, mask = left_padded([7, 4], CASE.vocab, seed=24)
    assert_same_greedy(hf, restored, ids, mask, 12)


def test_cli_cache_info_and_clear(saved_case, tmp_path, monkeypatch):
    _, path = saved_case(CASE)
    monkeypatch.setenv("NX_CACHE_DIR", str(tmp_path))
    model = nx.load("llama", path, **OPTS)
    n = len(model.program_shapes())
    res = CliRunner().invoke(main, ["cache", "info"])
    assert res.exit_code == 0 and f"{n} programs" in res.output and str(tmp_path) in res.output
    res = CliRunner().invoke(main, ["compile", "llama", path, "--out", str(tmp_path / "art"), "--batch-size", "2",
                                    "--n-positions", "32,64", "--context-length-estimate", "16", "--decode-steps", "1"])
    assert res.exit_code == 0, res.output
    # the artifact adds the prefill of the last 16-token chunk of 33..64-token prompts (64 positions)
    assert f"({n} of {n + 1} programs from the compile cache)" in res.stderr
    res = CliRunner().invoke(main, ["cache", "clear"])
    assert res.exit_code == 0 and f"removed {n + 1} programs" in res.output
    assert CompileCache(tmp_path).entries() == []
    monkeypatch.setenv("NX_CACHE_DIR", "off")
    res = CliRunner().invoke(main, ["cache", "info"])
    assert res.exit_code == 0 and "disabled" in res.output


def test_unwritable_cache_warns_and_still_runs(saved_case, tmp_path):
    hf, path = saved_case(CASE)
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = nx.load("llama", path, compile_cache=blocker, **OPTS)
    assert any("unavailable" in str(w.message) for w in caught)
    ids, mask = left_padded([7, 4], CASE.vocab, seed=25)
    assert_same_greedy(hf, model, ids, mask, 8)
