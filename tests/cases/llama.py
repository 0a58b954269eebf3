from transformers import LlamaConfig, LlamaForCausalLM

from tests.cases import Case, seeded


def _llama(**kw):
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        initializer_range=0.2,
        rms_norm_eps=1e-5,
    )
    base.update(kw)
    return seeded(lambda: LlamaForCausalLM(LlamaConfig(**base)))


CASES = [
    Case("llama", "llama-gqa", _llama()),
    Case("llama", "llama-mqa-tied", _llama(num_key_value_heads=1, tie_word_embeddings=True)),
    Case(
        "llama",
        "llama3-rope-scaling-bias",
        _llama(
            num_key_value_heads=4,
            rope_theta=500000.0,
            rope_scaling={
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
            attention_bias=True,
            mlp_bias=True,
        ),
    ),
]
