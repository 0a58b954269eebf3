"""Token selection inside the compiled programs: greedy, temperature, top-k, top-p (nucleus),
repetition penalty and suppressed tokens, so only token ids cross to the host each step."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class SamplingInputs(NamedTuple):
    """Traced per-call sampling state (`seen` is carried from step to step on the device)."""

    temperature: jnp.ndarray  # [B] f32
    top_k: jnp.ndarray  # [B] i32, <= 0 disables
    top_p: jnp.ndarray  # [B] f32, 1.0 disables
    penalty: jnp.ndarray  # [] f32 repetition penalty, 1.0 disables
    seen: jnp.ndarray  # [B, V] bool: tokens already in each row (for the penalty)
    suppress: jnp.ndarray  # [V] bool: tokens that may not be chosen this step (EOS before min_new_tokens)
    key: jnp.ndarray  # PRNG key data for this step


def process(logits: jnp.ndarray, s: SamplingInputs) -> jnp.ndarray:
    """Repetition penalty (HF's rule: divide positive, multiply negative) and suppression."""
    penalized = jnp.where(logits > 0, logits / s.penalty, logits * s.penalty)
    logits = jnp.where(s.seen, penalized, logits)
    return jnp.where(s.suppress[None, :], -jnp.inf, logits)


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


def choose(logits: jnp.ndarray, s: SamplingInputs, sample: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Pick the next token of every row; returns (tokens [B] i32, updated `seen`)."""
    logits = process(logits.astype(jnp.float32), s)
    if sample:
        scaled = logits / s.temperature[:, None]
        scaled = filter_top_k_top_p(scaled, s.top_k, s.top_p)
        key = jax.random.wrap_key_data(s.key)
        tokens = jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)
    else:
        tokens = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    seen = s.seen.at[jnp.arange(tokens.shape[0]), tokens].set(True)
    return tokens, seen
