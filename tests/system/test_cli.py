"""`nx generate` on a tiny checkpoint with a character tokenizer: streaming, sampling flags, errors."""

from __future__ import annotations

import json

import click
import pytest
from click.testing import CliRunner

from nx.cli import main
from tests.cases.llama import CASES

CASE = CASES[0]
FAST = ["--n-positions", "64", "--context-length-estimate", "32", "-n", "8"]


@pytest.fixture(scope="module")
def ckpt(llama_chat_ckpt):
    return llama_chat_ckpt


def _run(*args):
    return CliRunner().invoke(main, list(args))


def test_generate_streams_text_and_reports(ckpt):
    res = _run("generate", "llama", ckpt, "-p", "Hello", *FAST)
    assert res.exit_code == 0, res.output
    assert res.stdout.strip(), "expected generated text on stdout"
    assert "prompt 5 tokens" in res.stderr and "tokens/s" in res.stderr and "first token" in res.stderr


def test_generate_compiles_only_the_programs_of_its_request(ckpt, monkeypatch):
    """Five bucket programs exist; a 5-token prompt with 8 new tokens runs two, and a prompt too
    long for its new tokens fails before anything compiles."""
    monkeypatch.setenv("NX_CACHE_DIR", "off")
    buckets = ["--n-positions", "32,64", "--context-length-estimate", "8,16,32"]
    res = _run("generate", "llama", ckpt, "-p", "Hello", "-n", "8", *buckets)
    assert res.exit_code == 0, res.output
    assert "| compile 2 programs" in res.stderr and "prompt 5 tokens" in res.stderr
    res = _run("generate", "llama", ckpt, "-p", "Hello", "-n", "60", *buckets)
    assert res.exit_code == 2 and "needs 65 positions" in res.stderr and "compile" not in res.stderr


def test_family_is_inferred_and_chat_template_applied(ckpt):
    res = _run("generate", ckpt, "-p", "Hi", "--chat", *FAST)
    assert res.exit_code == 0, res.output
    assert "prompt 19 tokens" in res.stderr  # "<user>Hi<assistant>" in characters


def test_sampling_flags_are_reproducible(ckpt):
    a = _run("generate", "llama", ckpt, "-p", "Hello", "--temperature", "1.5", "--top-k", "20", "--seed", "3", *FAST)
    b = _run("generate", "llama", ckpt, "-p", "Hello", "--temperature", "1.5", "--top-k", "20", "--seed", "3", *FAST)
    assert a.exit_code == 0 and a.stdout == b.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["-p", ""], "prompt is empty"),
        (["-p", "Hi", "--temperature", "0"], "temperature must be > 0"),
        (["-p", "Hi", "--top-p", "1.5"], "top_p must be in (0, 1]"),
        (["-p", "Hi", "--top-k", "0"], "top_k must be an int >= 1"),
    ],
)
def test_bad_input_is_one_clear_line(ckpt, args, message):
    res = _run("generate", "llama", ckpt, *args, *FAST)
    assert res.exit_code == 2
    assert message in res.stderr and "Traceback" not in res.output


def test_unknown_family_is_one_clear_line(ckpt):
    res = _run("generate", "mamba", ckpt, "-p", "x")
    assert res.exit_code == 2 and "pip install nx-plugin-mamba" in res.stderr


def _no_tokenizer_error(res):
    assert res.exit_code == 2 and "Traceback" not in res.output, res.output
    assert "has no usable tokenizer" in res.stderr
    assert all(f in res.stderr for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt"))


def test_checkpoint_without_tokenizer_files(saved_case):
    """Text commands name the tokenizer files they looked for; token ids still generate."""
    import nx

    _, path = saved_case(CASE)
    for command in ("generate", "chat"):
        res = CliRunner().invoke(main, [command, "llama", path, "-p" if command == "generate" else "-n", "x" if
                                        command == "generate" else "4", *FAST[:4]], input="hi\n")
        _no_tokenizer_error(res)
        assert f"nx {command} needs one" in res.stderr
    model = nx.load("llama", path, n_positions=64, context_length_estimate=32, compile=False, progress=False)
    assert model.tokenizer is None
    assert model.generate([[5, 6, 7]], max_new_tokens=3, eos_token_id=[]).shape == (1, 6)


def test_empty_tokenizer_counts_as_none(saved_case, tmp_path):
    """transformers builds a tokenizer with no vocabulary from some directories instead of failing."""
    import shutil

    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    _, path = saved_case(CASE)
    shutil.copytree(path, tmp_path, dirs_exist_ok=True)
    PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE())).save_pretrained(tmp_path)
    _no_tokenizer_error(_run("generate", "llama", str(tmp_path), "-p", "x", *FAST))


def test_unroll_and_quant_flags_keep_greedy_text(ckpt):
    """--unroll 1 (scanned layers) gives the same greedy text; --quant s8 runs int8 weights."""
    plain = _run("generate", "llama", ckpt, "-p", "Hello", *FAST)
    scanned = _run("generate", "llama", ckpt, "-p", "Hello", "--unroll", "1", *FAST)
    assert plain.exit_code == 0 and scanned.exit_code == 0, scanned.output
    assert scanned.stdout == plain.stdout and "| compile 2 programs" in scanned.stderr
    int8 = _run("generate", "llama", ckpt, "-p", "Hello", "--quant", "s8", "--unroll", "1", *FAST)
    assert int8.exit_code == 0 and int8.stdout.strip(), int8.output


def test_bad_unroll_is_one_clear_line(ckpt):
    res = _run("generate", "llama", ckpt, "-p", "Hi", "--unroll", "3", *FAST)
    assert res.exit_code == 2 and "valid values: [1, 2]" in res.stderr and "Traceback" not in res.output


def test_progress_lines_off_a_terminal_and_quiet(ckpt, monkeypatch):
    """Off a terminal (CliRunner's stderr is no tty) each step is a plain line with its time;
    --quiet leaves stderr to errors, and the generated text is the same."""
    monkeypatch.setenv("NX_CACHE_DIR", "off")
    res = _run("generate", "llama", ckpt, "-p", "Hello", *FAST)
    assert res.exit_code == 0, res.output
    for line in (f"loading {ckpt} ...", "loading weights ...", "compiling 2 programs ...", "compiling 2 programs: done in"):
        assert line in res.stderr, res.stderr
    assert "tokens/s" in res.stderr
    quiet = _run("generate", "llama", ckpt, "-p", "Hello", "--quiet", *FAST)
    assert quiet.exit_code == 0 and quiet.stdout == res.stdout
    assert quiet.stderr == "", quiet.stderr


def test_several_prompts_run_as_one_batch_like_each_alone(ckpt, tmp_path):
    """Two --prompt and a --prompts-file line make a batch of 3 left-padded rows (different
    lengths); each labelled greedy answer equals that prompt's answer run alone."""
    texts = ["Hello", "The quick brown fox", "Hi"]
    file = tmp_path / "prompts.jsonl"
    file.write_text(json.dumps({"prompt": texts[2]}) + "\n\n")
    res = _run("generate", "llama", ckpt, "-p", texts[0], "-p", texts[1], "--prompts-file", str(file), *FAST)
    assert res.exit_code == 0, res.output
    assert "3 prompts" in res.stderr and "prompt 19 tokens" in res.stderr  # padded to the longest
    lines = res.stdout.split("\n")
    for n, text in enumerate(texts, 1):
        at = lines.index(f"[{n}/3] {text}")
        alone = _run("generate", "llama", ckpt, "-p", text, "-q", *FAST)
        assert alone.exit_code == 0, alone.output
        assert lines[at + 1] == alone.stdout.strip(), (text, res.stdout, alone.stdout)
    assert any(lines[lines.index(f"[{n}/3] {t}") + 1] for n, t in enumerate(texts, 1))  # not all empty


def test_prompts_file_errors_name_the_line(ckpt, tmp_path):
    file = tmp_path / "bad.jsonl"
    file.write_text('{"prompt": "ok"}\n{"text": "no"}\n')
    res = _run("generate", "llama", ckpt, "--prompts-file", str(file), *FAST)
    assert res.exit_code == 2 and "line 2 has no \"prompt\" string" in res.stderr
    res = _run("generate", "llama", ckpt, *FAST)
    assert res.exit_code == 2 and "--prompts-file" in res.output


def _commands(group, prefix=()):
    for name, command in group.commands.items():
        if isinstance(command, click.Group):
            yield from _commands(command, (*prefix, name))
        else:
            yield (*prefix, name), command


def test_every_option_of_every_command_explains_itself():
    """--help of every command (walked, not listed) shows help text for each option, and options
    of the same name mean the same type everywhere (--quiet is on all)."""
    seen: dict[str, str] = {}
    names = []
    for path, command in _commands(main):
        names.append(" ".join(path))
        res = _run(*path, "--help")
        assert res.exit_code == 0, res.output
        for param in command.params:
            if isinstance(param, click.Option):
                assert param.help and param.help.strip(), f"nx {' '.join(path)} {param.opts[0]} has no help"
                assert param.opts[0] in res.output
                assert seen.setdefault(param.opts[0], param.type.name) == param.type.name, param.opts[0]
        assert "--quiet" in res.output, path
    assert {"generate", "chat", "serve", "bench", "compile", "list-models", "cache info", "cache clear"} <= set(names)


def test_wrong_family_hint_shows_python_and_cli_syntax(ckpt):
    res = _run("generate", "gpt2", ckpt, "-p", "x", *FAST)
    assert res.exit_code == 2 and "nx.load(" in res.stderr and f"nx generate {ckpt}" in res.stderr
