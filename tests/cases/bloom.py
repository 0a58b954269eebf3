from transformers import BloomConfig, BloomForCausalLM

from tests.cases import Case, seeded


def _bloom(**kw):
    base = dict(vocab_size=256, hidden_size=64, n_layer=2, n_head=4, initializer_range=0.2)
    base.update(kw)
    return seeded(lambda: BloomForCausalLM(BloomConfig(**base)))


CASES = [
    Case("bloom", "bloom", _bloom()),
    Case("bloom", "bloom-6heads", _bloom(hidden_size=96, n_head=6)),  # ALiBi slopes for a non power of two
    Case("bloom", "bloom-residual-post-ln", _bloom(apply_residual_connection_post_layernorm=True, n_layer=3)),
]
