"""Compiled artifacts (``model.save`` / ``nx.load(dir)`` / ``nx compile``), HLO dumps, and
``nx.save_pretrained_split``, on a tiny llama checkpoint with a character tokenizer."""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from jax import monitoring

import nx
from nx import artifacts, dump, executables, xla_options
from nx.buckets import ProgramKey
from nx.cli import main
from nx.loader import load_artifact
from nx.programs import ProgramSet
from tests.cases.llama import CASES
from tests.conftest import char_tokenizer, hf_greedy, left_padded

CASE = CASES[0]
OPTS = dict(n_positions=[32, 64], context_length_estimate=[16], decode_steps=1, progress=False)  # one-step program names
PROMPT = [[5, 9, 77, 31, 2, 140, 66, 12, 201]]
COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


@pytest.fixture(scope="module")
def ckpt(llama_chat_ckpt):
    return llama_chat_ckpt


@pytest.fixture(scope="module")
def saved(ckpt, tmp_path_factory):
    """(int8 model, its greedy tokens for PROMPT, artifact directory)."""
    model = nx.load("llama", ckpt, quant="s8", **OPTS)
    ref = model.generate(PROMPT, max_new_tokens=20, eos_token_id=[]).tolist()
    out = tmp_path_factory.mktemp("art") / "model"
    model.save(out)
    return model, ref, out


@pytest.fixture
def copy(saved, tmp_path):
    """A scratch copy of the artifact to damage."""
    dst = tmp_path / "copy"
    shutil.copytree(saved[2], dst)
    return dst


def _python(script: str, **env) -> dict:
    base = {k: v for k, v in os.environ.items() if k != "JAX_NUM_CPU_DEVICES"}  # a plain fresh process
    res = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(script)],
        capture_output=True, text=True, timeout=600, cwd=os.getcwd(), env=dict(base, **env),
    )
    assert res.returncode == 0, res.stderr[-4000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def _nx_programs(compiled: list[str]) -> list[str]:
    """The nx programs among compiled functions (each is named after its key: `nx.programs.program_name`)."""
    return [n for n in compiled if n and n.startswith("jit(nx_")]


def test_manifest_describes_the_artifact(saved):
    model, _, out = saved
    m = artifacts.read_manifest(out)
    assert m["family"] == "llama" and m["quant"]["quant_dtype"] == "s8"
    assert m["environment"]["jax_version"] == jax.__version__ and m["environment"]["device_count"] == 1
    assert m["buckets"] == {"n_positions": [32, 64], "context_length_estimate": [16]}
    assert {p["file"] for p in m["programs"]} == {
        "programs/prefill_b1_t16_w32.xla", "programs/decode_b1_w32.xla", "programs/decode_b1_w64.xla",
        "programs/prefill_b1_t16_w64.xla",  # the last chunk of prompts of 33..64 tokens
    }
    assert "layers.0.qkv.w" in m["quantized"] and m["spec"]["n_layers"] == model.spec.n_layers
    for rel in ("weights.safetensors", "config.json", "tokenizer.json", *(p["file"] for p in m["programs"])):
        assert len(m["files"][rel]) == 64


def test_fresh_process_loads_without_compiling_and_generates_the_same(saved):
    _, ref, out = saved
    r = _python(
        f"""
        import json
        from jax import monitoring
        compiles = []
        monitoring.register_event_duration_secs_listener(
            lambda event, secs, **kw: compiles.append(kw.get("fun_name")) if event == {COMPILE_EVENT!r} else None)
        import nx
        model = nx.load({str(out)!r})
        at_load = list(compiles)
        tokens = model.generate({PROMPT!r}, max_new_tokens=20, eos_token_id=[]).tolist()
        after_generate = list(compiles)
        text = model.tokenizer.decode([40, 41, 42])
        model.executable(1, 1, 64, True)  # a program the artifact lacks: the signal must see it compile
        print(json.dumps(dict(at_load=at_load, after_generate=after_generate, after_new=compiles,
                              tokens=tokens, text=text)))
        """,
        NX_CACHE_DIR="off",  # the new program must compile, not come from the compile cache
    )
    assert r["tokens"] == ref
    assert not _nx_programs(r["at_load"]) and not _nx_programs(r["after_generate"])
    assert len(r["at_load"]) <= 1  # at most the KV-cache zero fill, never an nx program
    assert _nx_programs(r["after_new"]) == ["jit(nx_decode_b1_w64_sample)"]  # ... while compiling one is counted
    assert r["text"] == char_tokenizer().decode([40, 41, 42])


def test_tensor_parallel_int8_artifact_loads_in_a_fresh_process(ckpt, tmp_path):
    """Saved with tp=2 here (the suite has 4 CPU devices); the fresh process has no device flags:
    nx.load creates the two host devices itself, places the saved (re-laid out) shards, and runs."""
    model = nx.load("llama", ckpt, tp_degree=2, quant="s8", n_positions=[32], context_length_estimate=[16],
                    progress=False)
    ref = model.generate(PROMPT, max_new_tokens=10, eos_token_id=[]).tolist()
    model.save(tmp_path / "tp2")
    m = artifacts.read_manifest(tmp_path / "tp2")
    assert m["environment"]["device_count"] == 2 and m["runtime"]["tp_degree"] == 2
    r = _python(
        f"""
        import json
        import nx
        model = nx.load({str(tmp_path / "tp2")!r})
        qkv = model.params["layers"][0]["qkv"]["w"]
        print(json.dumps(dict(
            tokens=model.generate({PROMPT!r}, max_new_tokens=10, eos_token_id=[]).tolist(),
            shards=[list(s.data.shape) for s in qkv.q.addressable_shards], compiled=len(model.compiled_shapes))))
        """
    )
    assert r["tokens"] == ref
    assert len(r["shards"]) == 2 and r["shards"][0][1] * 2 == model.spec.qkv_dim
    assert r["compiled"] == len(m["programs"])


def test_bf16_artifact_round_trips_in_process(ckpt, tmp_path):
    model = nx.load("llama", ckpt, amp="bf16", **OPTS)
    ref = model.generate(PROMPT, max_new_tokens=8, eos_token_id=[])
    model.save(tmp_path / "bf16")
    back = nx.load(tmp_path / "bf16")
    assert back.params["layers"][0]["qkv"]["w"].dtype == jax.numpy.bfloat16
    assert torch.equal(back.generate(PROMPT, max_new_tokens=8, eos_token_id=[]), ref)


def test_warmup_runs_each_saved_program_once_and_changes_no_result(saved, monkeypatch):
    _, ref, out = saved
    ran = []
    real_run = ProgramSet.run

    def spy(self, key, *args, **kwargs):
        ran.append(tuple(key[:3]))
        return real_run(self, key, *args, **kwargs)

    monkeypatch.setattr(ProgramSet, "run", spy)
    model = nx.load(out, warmup=True, progress=False)
    shapes = model.program_shapes()
    assert sorted(ran) == sorted((k.rows, k.tokens, k.window) for k in shapes)
    # the artifact's programs, loaded (those warmed) or still offered: none compiled
    assert sorted(model.compiled_shapes + model.programs.offered) == sorted(nx.buckets.all_keys(model.config))
    assert model.generate(PROMPT, max_new_tokens=20, eos_token_id=[]).tolist() == ref


def test_artifact_serves_prompts_longer_than_its_prompt_buckets_without_compiling(saved, caplog):
    """A 40-token prompt runs in chunks of 16 whose last one attends over the 64-position bucket:
    the artifact holds that program, so nothing compiles and no warning is logged; a sampled
    request needs programs it lacks, which are compiled after a warning naming them and the fix."""
    model, _, out = saved
    long_prompt = [[(7 * i) % 200 + 3 for i in range(40)]]
    assert [w for _, _, w in nx.buckets.prompt_chunks(model.config, 40)] == [32, 32, 64]
    ref = model.generate(long_prompt, max_new_tokens=8, eos_token_id=[]).tolist()
    back = nx.load(out, progress=False)
    held = {key for key, _, _ in artifacts.read(out).programs()}
    with caplog.at_level("WARNING", logger="nx"):
        assert back.generate(long_prompt, max_new_tokens=8, eos_token_id=[]).tolist() == ref
        assert set(back.compiled_shapes) <= held and not caplog.records
        back.generate(PROMPT, max_new_tokens=2, do_sample=True, seed=0)
    assert not set(back.compiled_shapes) <= held
    assert "has no program prefill_b1_t16_w32_sample" in caplog.text and "--sampling" in caplog.text


def test_load_options_must_match_the_artifact(saved):
    out = saved[2]
    with pytest.raises(nx.ConfigError, match="n_positions"):
        nx.load(out, n_positions=[128])
    with pytest.raises(nx.ConfigError, match="not 'gpt2'"):
        nx.load("gpt2", out)
    same = nx.load("llama", out, n_positions=[32, 64], quant="s8")  # restating what it was built with is fine
    assert same.config.n_positions == (32, 64)


@pytest.mark.parametrize("target", ["weights.safetensors", "programs/decode_b1_w32.xla"])
def test_corrupt_or_truncated_file_is_an_artifact_error(copy, target):
    f = copy / target
    data = bytearray(f.read_bytes())
    if target.endswith(".xla"):
        f.write_bytes(bytes(data[: len(data) // 2]))  # truncated
    else:
        data[len(data) // 2] ^= 0xFF  # one flipped byte
        f.write_bytes(bytes(data))
    with pytest.raises(nx.ArtifactError, match="corrupt or truncated"):
        nx.load(copy)


def test_undeserializable_program_is_an_artifact_error_when_first_needed(copy):
    f = copy / "programs" / "decode_b1_w64.xla"
    f.write_bytes(f.read_bytes()[:-1000])  # checksums skipped: XLA itself must reject it
    model = load_artifact(copy, verify=False)  # programs load when first needed
    with pytest.raises(nx.ArtifactError, match="cannot load the compiled program programs/decode_b1_w64.xla"):
        model.programs.get(ProgramKey(1, 1, 64, False))


class Payload:
    """A pickle that runs `call(*args)` when unpickled: what a planted program file would hold."""

    def __init__(self, call, *args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


def payloads(marker: Path) -> dict[str, bytes]:
    """Pickles that create `marker` when loaded with plain pickle, by shell or by Python."""
    return {"os.system": pickle.dumps(Payload(os.system, f"touch {marker}")),
            "exec": pickle.dumps(Payload(exec, f"open({str(marker)!r}, 'w').close()")),
            "inside a tuple": pickle.dumps((Payload(os.system, f"touch {marker}"), [], True))}


def _plant(art: Path, rel: str, data: bytes) -> None:
    """Write `data` as `rel` and give the manifest its sha256, as a tamperer would."""
    (art / rel).write_bytes(data)
    mf = art / artifacts.MANIFEST
    m = json.loads(mf.read_text())
    m["files"][rel] = hashlib.sha256(data).hexdigest()
    mf.write_text(json.dumps(m))


def _load_all(art: Path) -> None:
    """Load an artifact and every program it holds (they load when first needed)."""
    nx.load(art, compile=False, progress=False).compile()


@pytest.mark.parametrize("how", ["os.system", "exec", "inside a tuple", "behind an nx header"])
def test_a_planted_pickle_with_matching_checksums_runs_no_code(copy, tmp_path, how):
    marker = tmp_path / "MARKER"
    payload = payloads(marker)["os.system" if how == "behind an nx header" else how]
    pickle.loads(payload)  # the payload is real: plain pickle runs it
    assert marker.exists()
    marker.unlink()
    rel = "programs/decode_b1_w32.xla"
    if how == "behind an nx header":  # the manifest's own signature, then the pickle where XLA's bytes go
        real = (copy / rel).read_bytes()
        payload = real[: len(real) - len(_xla_bytes(real))] + payload
        error = r"cannot load the compiled program programs/decode_b1_w32.xla.*recompile"
    else:
        error = r"programs/decode_b1_w32.xla.*not an nx program file.*recompile"
    _plant(copy, rel, payload)
    with pytest.raises(nx.ArtifactError, match=error):
        _load_all(copy)
    assert not marker.exists()


def _xla_bytes(blob: bytes) -> bytes:
    """The XLA part of a program file (after its magic, header length and JSON header)."""
    start = len(executables.MAGIC) + 8
    return blob[start + int.from_bytes(blob[len(executables.MAGIC) : start], "little") :]


def test_program_files_hold_no_pickle(saved):
    for prog in (saved[2] / "programs").iterdir():
        blob = prog.read_bytes()
        assert blob.startswith(executables.MAGIC)
        with pytest.raises(pickle.UnpicklingError):
            pickle.loads(blob)
        assert isinstance(executables.read_header(blob), dict)


def test_swapped_programs_are_an_artifact_error_naming_the_program(copy):
    a, b = (copy / "programs/decode_b1_w32.xla").read_bytes(), (copy / "programs/decode_b1_w64.xla").read_bytes()
    _plant(copy, "programs/decode_b1_w32.xla", b)  # same shapes, another window: only its identity differs
    _plant(copy, "programs/decode_b1_w64.xla", a)
    with pytest.raises(nx.ArtifactError, match=r"decode_b1_w(32|64).xla.*signature \(program\) differs from the one the manifest"):
        _load_all(copy)
    mf = copy / artifacts.MANIFEST  # a tamperer who swaps the manifest's signatures too: the model's check remains
    m = json.loads(mf.read_text())
    entries = {p["file"]: p for p in m["programs"]}
    w32, w64 = entries["programs/decode_b1_w32.xla"], entries["programs/decode_b1_w64.xla"]
    w32["signature"], w64["signature"] = w64["signature"], w32["signature"]
    mf.write_text(json.dumps(m))
    with pytest.raises(nx.ArtifactError, match=r"decode_b1_w(32|64) is not this model's decode_b1_w(32|64): it is .*recompile"):
        _load_all(copy)


def test_a_header_that_lies_about_its_program_is_an_artifact_error(copy):
    """The w64 file's header (it matches the manifest and the model) over the w32 executable."""
    a, b = (copy / "programs/decode_b1_w32.xla").read_bytes(), (copy / "programs/decode_b1_w64.xla").read_bytes()
    _plant(copy, "programs/decode_b1_w64.xla", b[: len(b) - len(_xla_bytes(b))] + _xla_bytes(a))
    with pytest.raises(nx.ArtifactError, match=r"decode_b1_w64.xla.*header says it is 'jit_nx_decode_b1_w64'.*"
                                               r"'jit_nx_decode_b1_w32'.*altered"):
        _load_all(copy)


def test_a_signature_other_than_the_manifests_is_an_artifact_error(copy):
    mf = copy / artifacts.MANIFEST
    m = json.loads(mf.read_text())
    entry = next(p for p in m["programs"] if p["file"] == "programs/decode_b1_w64.xla")
    assert entry["signature"]["program"] == "jit_nx_decode_b1_w64"
    entry["signature"]["inputs"][-1] = "u32[9,2]"
    mf.write_text(json.dumps(m))
    with pytest.raises(nx.ArtifactError, match=r"decode_b1_w64.xla.*signature \(inputs\) differs from the one the manifest"):
        _load_all(copy)


def test_a_program_of_other_shapes_is_refused_before_it_runs(saved):
    model = saved[0]
    prefill = model.programs.get(ProgramKey(1, 16, 32, False))
    with pytest.raises(nx.ArtifactError, match=r"decode_b1_w32: it is 'jit_nx_prefill_b1_t16_w32'; .*input"):
        model.programs.check(ProgramKey(1, 1, 32, False), prefill.signature)
    model.programs.check(ProgramKey(1, 16, 32, False), prefill.signature)  # its own key passes


def test_missing_file_is_an_artifact_error(copy):
    (copy / "programs" / "decode_b1_w64.xla").unlink()
    with pytest.raises(nx.ArtifactError, match="missing"):
        nx.load(copy)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("jax_version", "0.0.1", "compiled with jax 0.0.1"),
        ("jaxlib_version", "0.0.1", "compiled with jaxlib 0.0.1"),
        ("nx_version", "0.0.0-other", "compiled with nx 0.0.0-other"),
        ("platform_version", "some other cpu runtime", "compiled for cpu"),
        ("device_count", 64, "compiled for 64 cpu devices"),
        ("cpu_features", ["avx512f", "made_up_feature"], "made_up_feature"),
        ("cpu_kernels", "nx-kernels-cpu 9.9", "compiled with nx-kernels-cpu 9.9"),
    ],
)
def test_foreign_manifest_asks_to_recompile(copy, key, value, message):
    mf = copy / artifacts.MANIFEST
    m = json.loads(mf.read_text())
    m["environment"][key] = value
    mf.write_text(json.dumps(m))
    with pytest.raises(nx.ArtifactError, match=message) as err:
        nx.load(copy)
    assert "recompile" in str(err.value) or "JAX_NUM_CPU_DEVICES" in str(err.value)


def test_older_format_asks_to_recompile(copy):
    """A format-2 artifact's bf16/f16 programs take 16-bit caches, not today's uint16 ones."""
    mf = copy / artifacts.MANIFEST
    m = json.loads(mf.read_text())
    m["format"] = artifacts.FORMAT - 1
    mf.write_text(json.dumps(m))
    with pytest.raises(nx.ArtifactError, match=f"nx reads format {artifacts.FORMAT}; recompile"):
        nx.load(copy)


def test_unreadable_manifest_is_an_artifact_error(copy):
    (copy / artifacts.MANIFEST).write_text("{not json")
    with pytest.raises(nx.ArtifactError, match="recompile"):
        nx.load(copy)


def test_save_refuses_a_directory_that_is_not_an_artifact(saved, tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(nx.ArtifactError, match="not an nx artifact"):
        saved[0].save(tmp_path)


def test_saving_over_an_artifact_replaces_it(saved, copy):
    (copy / "programs" / "decode_b1_w64.xla").write_bytes(b"stale")
    saved[0].save(copy)
    assert nx.load(copy).generate(PROMPT, max_new_tokens=20, eos_token_id=[]).tolist() == saved[1]


def test_a_restored_artifact_saves_again_as_a_working_artifact(saved, tmp_path):
    """XLA:CPU re-serializes a deserialized program without some of its kernels (it then fails
    when run), so a restored model must save the bytes it was loaded from."""
    _, ref, out = saved
    again = nx.load(out).save(tmp_path / "again")
    for prog in json.loads((out / artifacts.MANIFEST).read_text())["programs"]:
        assert (again / prog["file"]).read_bytes() == (out / prog["file"]).read_bytes()
    assert nx.load(again).generate(PROMPT, max_new_tokens=20, eos_token_id=[]).tolist() == ref


def test_save_pretrained_split_writes_a_checkpoint_nx_loads(tmp_path):
    hf = CASES[1].build()  # tied embeddings: stored once
    out = nx.save_pretrained_split(hf, tmp_path / "split", max_shard_size="40KB", tokenizer=char_tokenizer())
    assert (out / "config.json").exists() and (out / "model.safetensors.index.json").exists()
    model = nx.load(out, **OPTS)
    ids, mask = left_padded([9], CASE.vocab, seed=8)
    assert torch.equal(model.generate(ids, max_new_tokens=12, eos_token_id=[]), hf_greedy(hf, ids, mask, 12))
    assert model.tokenizer is not None
    with pytest.raises(nx.CheckpointError, match="PreTrainedModel"):
        nx.save_pretrained_split(object(), tmp_path / "bad")


def test_dumped_hlo_proto_compiles_and_runs_like_the_nx_program(ckpt, tmp_path, monkeypatch):
    monkeypatch.setenv(dump.ENV, str(tmp_path / "hlo"))
    model = nx.load("llama", ckpt, quant="s8", **OPTS)  # compiles every bucket, dumping each
    names = sorted(p.name for p in (tmp_path / "hlo").iterdir())
    for stem in ("prefill_b1_t16_w32", "decode_b1_w32", "decode_b1_w64"):
        assert {f"{stem}.hlo.txt", f"{stem}.hlo.pb", f"{stem}.json"} <= set(names)

    key = ProgramKey(1, 16, 32, False)
    proto = tmp_path / "hlo" / f"{dump.program_name(*key)}.hlo.pb"
    text = (tmp_path / "hlo" / f"{dump.program_name(*key)}.hlo.txt").read_text()
    assert dump.load_proto(proto).as_hlo_text() == text  # parses back to the same module
    meta = json.loads(proto.with_suffix("").with_suffix(".json").read_text())
    assert meta["parameters"][0]["name"].startswith("params.") and any(p["donated"] for p in meta["parameters"])
    assert meta["xla_options"] == xla_options.compiler_options("cpu")  # compile_proto applies them

    ids = np.random.default_rng(0).integers(3, CASE.vocab, (1, 16)).astype(np.int32)
    inp, smp = jax.tree.map(lambda s: model.put(np.zeros(s.shape, s.dtype)), model.programs.abstract_inputs(key))
    inp = inp._replace(tokens=model.put(ids), last=model.put(np.int32(15)))
    flat = jax.tree.leaves((model.params, model.kv.allocate(), inp, smp))
    kept = dump.kept_inputs(model.programs.lower(key))
    assert len(kept) == len(meta["parameters"])
    got = dump.compile_proto(proto).execute([flat[i] for i in kept])
    want = jax.tree.leaves(model.programs.get(key)(model.params, model.kv.allocate(), inp, smp))
    assert len(got) == len(want)
    for g, w in zip(got, want):
        np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_cli_compile_then_generate_from_the_artifact(ckpt, tmp_path):
    out, hlo = tmp_path / "art", tmp_path / "hlo"
    res = CliRunner().invoke(main, [
        "compile", "llama", ckpt, "--out", str(out), "--quant", "s8", "--n-positions", "32,64",
        "--context-length-estimate", "16", "--dump-hlo", str(hlo), "--workers", "2",
    ])
    assert res.exit_code == 0, res.output
    assert "compiled 4 programs" in res.stderr  # 3 buckets + the last chunk of 33..64-token prompts
    assert artifacts.is_artifact(out) and (hlo / "decode_b1_w64_k8.hlo.pb").exists()  # the default decode_steps

    compiles: list[str] = []

    def listen(event, secs, **kw):
        if event == COMPILE_EVENT:
            compiles.append(kw.get("fun_name"))

    monitoring.register_event_duration_secs_listener(listen)
    try:
        res = CliRunner().invoke(main, ["generate", str(out), "-p", "Hello", "-n", "8"])
    finally:
        monitoring.unregister_event_duration_listener(listen)
    assert res.exit_code == 0, res.output
    assert not _nx_programs(compiles)
    assert "[load " in res.stderr and "| compile" not in res.stderr
    ref = nx.load("llama", ckpt, quant="s8", **OPTS)
    tok = ref.tokenizer
    ids = tok("Hello")["input_ids"]
    text = tok.decode(ref.generate([ids], max_new_tokens=8)[0, len(ids):], skip_special_tokens=True)
    assert res.stdout.strip() == text.strip()


def test_cli_compile_rejects_quant_options_without_quant(ckpt, tmp_path):
    res = CliRunner().invoke(main, ["compile", "llama", ckpt, "--out", str(tmp_path / "x"), "--no-quantize", "embed.w"])
    assert res.exit_code == 2 and "--quant s8" in res.stderr


def test_is_artifact_only_for_manifest_directories(saved, ckpt):
    assert artifacts.is_artifact(saved[2]) and not artifacts.is_artifact(ckpt)
    assert not artifacts.is_artifact(Path(ckpt) / "config.json")
