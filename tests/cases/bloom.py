import torch
from transformers import BloomConfig, BloomForCausalLM

from tests.cases import Case, randomize_norms_and_biases, seeded


def _randomize(model):
    """Norms and biases randomized (their mapping and the per-head split of the fused
    query_key_value bias get tested). The embedding LayerNorm gain gets mean 0: with unit gains the
    tied head reads back the current token and greedy decoding just repeats it."""
    randomize_norms_and_biases(model)
    with torch.no_grad():
        model.transformer.word_embeddings_layernorm.weight.normal_(0.0, 1.0)
    return model


def _bloom(seed=0, **kw):
    base = dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=4, initializer_range=0.2)
    base.update(kw)
    return seeded(lambda: _randomize(BloomForCausalLM(BloomConfig(**base))), seed)


# Seeds are chosen so that greedy decoding of each tiny random model is not degenerate.
CASES = [
    Case("bloom", "bloom", _bloom(7)),
    Case("bloom", "bloom-6heads", _bloom(2, hidden_size=96, n_head=6)),  # ALiBi slopes for a non power of two
    Case("bloom", "bloom-residual-post-ln", _bloom(0, apply_residual_connection_post_layernorm=True)),
]
