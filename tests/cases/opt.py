from transformers import OPTConfig, OPTForCausalLM

from tests.cases import Case, randomize_norms_and_biases, seeded


def _opt(seed=0, **kw):
    base = dict(
        vocab_size=256,
        hidden_size=64,
        ffn_dim=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        init_std=0.3,  # OPT's name for initializer_range
    )
    base.update(kw)
    return seeded(lambda: randomize_norms_and_biases(OPTForCausalLM(OPTConfig(**base))), seed)


# Seeds and init scales are chosen so that greedy decoding of each tiny random model is not degenerate.
CASES = [
    Case("opt", "opt", _opt()),  # pre-LayerNorm with a final LayerNorm, tied head (opt-125m style)
    Case("opt", "opt-post-norm", _opt(do_layer_norm_before=False)),  # no final LayerNorm
    Case("opt", "opt-proj", _opt(word_embed_proj_dim=32)),  # project_in / project_out
    Case("opt", "opt-350m-style", _opt(1, do_layer_norm_before=False, word_embed_proj_dim=48, init_std=0.5)),
    Case(
        "opt", "opt-nobias-untied-gelu", _opt(enable_bias=False, tie_word_embeddings=False, activation_function="gelu")
    ),
]
