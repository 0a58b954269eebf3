"""`nx generate` on a tiny checkpoint with a character tokenizer: streaming, sampling flags, errors."""

from __future__ import annotations

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


def test_checkpoint_without_tokenizer(saved_case):
    _, path = saved_case(CASE)
    res = _run("generate", "llama", path, "-p", "x", *FAST)
    assert res.exit_code == 2 and "ships no tokenizer" in res.stderr


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
