from transformers import GPTJConfig, GPTJForCausalLM

from tests.cases import Case, seeded


def _gptj(**kw):
    base = dict(
        vocab_size=256,
        n_embd=64,
        n_layer=2,
        n_head=4,
        n_positions=256,
        rotary_dim=8,
        initializer_range=0.2,
        bos_token_id=0,
        eos_token_id=0,
    )
    base.update(kw)
    return seeded(lambda: GPTJForCausalLM(GPTJConfig(**base)))


CASES = [
    Case("gptj", "gptj", _gptj()),
    Case(
        "gptj",
        "gptj-full-rotary-relu-inner-tied",
        _gptj(rotary_dim=16, activation_function="relu", n_inner=96, n_layer=3, tie_word_embeddings=True),
    ),
]
