from transformers import GPT2Config, GPT2LMHeadModel

from tests.cases import Case, seeded


def _gpt2(**kw):
    base = dict(vocab_size=256, n_embd=64, n_layer=2, n_head=4, n_positions=256, initializer_range=0.2)
    base.update(kw)
    return seeded(lambda: GPT2LMHeadModel(GPT2Config(**base)))


CASES = [
    Case("gpt2", "gpt2", _gpt2()),
    Case("gpt2", "gpt2-relu-inner", _gpt2(activation_function="relu", n_inner=96, n_layer=3)),
]
