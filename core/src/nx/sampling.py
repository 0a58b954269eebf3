"""Token selection inside the compiled programs: greedy, temperature, top-k, top-p (nucleus),
repetition penalty and suppressed tokens, so only token ids cross to the host each step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingInputs(NamedTuple):
    """Traced per-row sampling state (`seen` is carried from step to step on the device), so rows
    with different settings share one program call."""

    temperature: jnp.ndarray  # [B] f32; 0 in a sampling program: that row is greedy
    top_k: jnp.ndarray  # [B] i32, <= 0 disables
    top_p: jnp.ndarray  # [B] f32, 1.0 disables
    penalty: jnp.ndarray  # [B] f32 repetition penalty, 1.0 disables
    seen: jnp.ndarray  # [B, V] bool: tokens already in each row (for the penalty)
    suppress: jnp.ndarray  # [B, V] bool: tokens a row may not choose this step (EOS before min_new_tokens)
    key: jnp.ndarray  # [B, key] PRNG key data of each row (folded with the position each step)


def process(logits: jnp.ndarray, s: SamplingInputs) -> jnp.ndarray:
    """Repetition penalty (HF's rule: divide positive, multiply negative) and suppression."""
    penalty = s.penalty[:, None]
    penalized = jnp.where(logits > 0, logits / penalty, logits * penalty)
    logits = jnp.where(s.seen, penalized, logits)
    return jnp.where(s.suppress, -jnp.inf, logits)


def filter_top_k_top_p(logits: jnp.ndarray, top_k: jnp.ndarray, top_p: jnp.ndarray) -> jnp.ndarray:
    """Mask (to -inf) tokens outside each row's top-k and outside its top-p nucleus."""
    v = logits.shape[-1]
    desc = -jnp.sort(-logits, axis=-1)
    k = jnp.where(top_k > 0, jnp.minimum(top_k, v), v)
    kth = jnp.take_along_axis(desc, (k - 1)[:, None], axis=-1)
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs  # mass of strictly more likely tokens
    keep = before < top_p[:, None]  # the top token is always kept
    n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
    pth = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)
    return jnp.where((logits >= kth) & (logits >= pth), logits, -jnp.inf)


def choose(logits: jnp.ndarray, s: SamplingInputs, sample: bool, position: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pick the next token of every row; returns (tokens [B] i32, updated `seen`). Row b draws
    with its key folded with ``position[b]``, so a seeded row repeats whatever shares its call."""
    logits = process(logits.astype(jnp.float32), s)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if sample:
        temperature = jnp.where(s.temperature > 0, s.temperature, 1.0)[:, None]
        scaled = filter_top_k_top_p(logits / temperature, s.top_k, s.top_p)
        keys = jax.vmap(jax.random.fold_in)(jax.random.wrap_key_data(s.key), position)
        drawn = jax.vmap(lambda k, row: jax.random.categorical(k, row))(keys, scaled).astype(jnp.int32)
        tokens = jnp.where(s.temperature > 0, drawn, greedy)
    else:
        tokens = greedy
    seen = s.seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)
    return tokens, seen
