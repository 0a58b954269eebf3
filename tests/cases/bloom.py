import torch
from transformers import BloomConfig, BloomForCausalLM

from tests.cases import Case, seeded


def _randomize_norms_and_biases(model, std=0.1):
    """HF initializes LayerNorms to (1, 0) and biases to 0, which would leave their mapping (and the
    per-head split of the fused query_key_value bias) untested. The embedding LayerNorm gain gets mean 0:
    with unit gains the tied head reads back the current token and greedy decoding just repeats it."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0.0, std)
            elif p.ndim == 1:  # LayerNorm gains
                p.normal_(1.0, 3 * std)
        model.transformer.word_embeddings_layernorm.weight.normal_(0.0, 1.0)
    return model


def _bloom(seed=0, **kw):
    base = dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=4, initializer_range=0.2)
    base.update(kw)
    return seeded(lambda: _randomize_norms_and_biases(BloomForCausalLM(BloomConfig(**base))), seed)


# Seeds are chosen so that greedy decoding of each tiny random model is not degenerate.
CASES = [
    Case("bloom", "bloom", _bloom(7)),
    Case("bloom", "bloom-6heads", _bloom(2, hidden_size=96, n_head=6)),  # ALiBi slopes for a non power of two
    Case("bloom", "bloom-residual-post-ln", _bloom(0, apply_residual_connection_post_layernorm=True)),
]
