from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

from tests.cases import Case, seeded


def _neox(**kw):
    base = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=256,
        initializer_range=0.3,
        rotary_pct=0.25,
        use_parallel_residual=True,
    )
    base.update(kw)
    return seeded(lambda: GPTNeoXForCausalLM(GPTNeoXConfig(**base)))


CASES = [
    Case("gptneox", "gptneox", _neox()),
    Case("gptneox", "gptneox-sequential-full-rotary", _neox(use_parallel_residual=False, rotary_pct=1.0)),
    Case(
        "gptneox",
        "gptneox-theta-gelu-tanh-nobias",
        _neox(
            rotary_pct=0.5,
            rotary_emb_base=500.0,
            hidden_act="gelu_new",
            attention_bias=False,
            tie_word_embeddings=True,
            num_hidden_layers=3,
        ),
    ),
]
