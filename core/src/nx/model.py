"""`NxModel`: a loaded model with its compiled programs, KV cache and `generate` loop.

Two kinds of program per model, each compiled once per bucket: context encoding (prefill of up
to C prompt tokens) and token generation (one token per row, attending over P cache positions).
Both take ``(params, caches, inputs)`` and return ``(next_tokens, logits, caches)`` with the caches
donated, so XLA updates them in place. Only token ids cross back to the host each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from nx import buckets, decoder
from nx.errors import BucketError, ConfigError, InputError
from nx.family import Family
from nx.progress import track
from nx.spec import ModelSpec

AMP_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


@dataclass(frozen=True)
class RuntimeConfig:
    """How a model is compiled: batch size, buckets, compute dtype and backend."""

    batch_size: int = 1
    n_positions: tuple[int, ...] = (128, 256, 512, 1024)
    context_buckets: tuple[int, ...] = (32, 64, 128, 256, 512, 1024)
    amp: str = "f32"
    backend: str = "cpu"

    @classmethod
    def build(
        cls,
        batch_size: int = 1,
        n_positions: int | Sequence[int] = 1024,
        context_length_estimate: int | Sequence[int] | None = None,
        amp: str = "f32",
        backend: str = "cpu",
    ) -> "RuntimeConfig":
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        if amp not in AMP_DTYPES:
            raise ConfigError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        pos = buckets.position_buckets(n_positions)
        ctx = buckets.context_buckets(context_length_estimate, pos)
        return cls(batch_size, tuple(pos), tuple(ctx), amp, backend)

    @property
    def max_positions(self) -> int:
        return self.n_positions[-1]


@dataclass
class GenerateOutput:
    """`sequences` ``[batch, prompt + new]`` (torch.long) and, if asked, per-step `scores`."""

    sequences: Any
    scores: list[np.ndarray] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _program(spec: ModelSpec, window: int):
    def run(params, caches, inp: decoder.StepInputs):
        logits, caches = decoder.step(spec, params, caches, inp, window)
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), logits, caches

    return jax.jit(run, donate_argnums=(1,))


class NxModel:
    """A compiled model. Create it with `nx.load`."""

    def __init__(
        self,
        family: Family,
        spec: ModelSpec,
        params: dict,
        config: RuntimeConfig,
        hf_config: Any = None,
        tokenizer_loader: Callable[[], Any] | None = None,
    ) -> None:
        self.family = family
        self.spec = spec
        self.config = config
        self.hf_config = hf_config
        self._tokenizer_loader = tokenizer_loader
        self._tokenizer: Any = None
        self.dtype = AMP_DTYPES[config.amp]
        try:
            self.device = jax.devices(config.backend)[0]
        except RuntimeError as exc:
            raise ConfigError(f"backend {config.backend!r} is not available here ({exc}); use backend='cpu'") from exc
        self.params = jax.device_put(jax.tree.map(self._cast, params), self.device)
        self.caches = self._new_caches()
        self._executables: dict[tuple[int, int], Any] = {}

    def _cast(self, a: np.ndarray):
        return a.astype(self.dtype) if np.issubdtype(a.dtype, np.floating) else a

    def _new_caches(self) -> list[tuple[jax.Array, jax.Array]]:
        s = self.spec
        shape = (self.config.batch_size, self.config.max_positions, s.kv_heads, s.head_dim)
        return [
            (jnp.zeros(shape, self.dtype, device=self.device), jnp.zeros(shape, self.dtype, device=self.device))
            for _ in range(s.n_layers)
        ]

    # ---- compilation -------------------------------------------------------------------------
    def program_shapes(self) -> list[tuple[int, int]]:
        """(tokens, window) of every program: one prefill per context bucket, one decode per position bucket."""
        return [(c, c) for c in self.config.context_buckets] + [(1, p) for p in self.config.n_positions]

    def _inputs_spec(self, n_tokens: int) -> decoder.StepInputs:
        b = self.config.batch_size
        i32 = jnp.int32
        return decoder.StepInputs(
            jax.ShapeDtypeStruct((b, n_tokens), i32),
            jax.ShapeDtypeStruct((), i32),
            jax.ShapeDtypeStruct((b,), i32),
            jax.ShapeDtypeStruct((), i32),
        )

    def lower(self, n_tokens: int, window: int):
        """The lowered (not yet compiled) program for `n_tokens` tokens over `window` positions."""
        fn = _program(self.spec, window)
        return fn.lower(self.params, self.caches, self._inputs_spec(n_tokens))

    def executable(self, n_tokens: int, window: int):
        key = (n_tokens, window)
        if key not in self._executables:
            self._executables[key] = self.lower(n_tokens, window).compile()
        return self._executables[key]

    def compile(self, progress: bool | None = None) -> "NxModel":
        """Compile every bucket's program now (otherwise each compiles on first use)."""
        shapes = self.program_shapes()
        for t, w in track(shapes, f"compiling {len(shapes)} programs", total=len(shapes), enabled=progress):
            self.executable(t, w)
        return self

    # ---- running -----------------------------------------------------------------------------
    def _run(self, tokens: np.ndarray | jax.Array, window: int, slot: int, pad: jax.Array, last: int):
        exe = self.executable(tokens.shape[1], window)
        inp = decoder.StepInputs(jnp.asarray(tokens, jnp.int32), jnp.int32(slot), pad, jnp.int32(last))
        next_tokens, logits, self.caches = exe(self.params, self.caches, inp)
        return next_tokens, logits

    def _prefill(self, ids: np.ndarray, pad: np.ndarray):
        b, length = ids.shape
        c = buckets.pick(
            list(self.config.context_buckets),
            length,
            f"a prompt of {length} tokens",
            "raise context_length_estimate (and n_positions) when loading the model, or shorten the prompt",
        )
        tokens = np.zeros((b, c), np.int32)
        tokens[:, :length] = ids
        return self._run(tokens, c, 0, jnp.asarray(pad, jnp.int32), length - 1)

    def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """Next-token logits ``[batch, vocab]`` (f32) after the prompt: one prefill, no generation."""
        ids, pad = self._prepare(input_ids, attention_mask)
        _, logits = self._prefill(ids, pad)
        return np.asarray(logits)

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        max_new_tokens: int = 32,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        streamer: Any = None,
        output_scores: bool = False,
        return_dict: bool = False,
    ):
        """Greedy generation, HF style: returns a ``torch.LongTensor [batch, prompt + new]``.

        Prompts in a batch are left-padded (``attention_mask`` 0 on padding). A row stops at its
        EOS and is filled with `pad_token_id` afterwards; the loop stops when every row is done.
        `streamer` takes HF streamer objects (``put``/``end``). With `return_dict` the result is a
        `GenerateOutput` (with per-step `scores` if `output_scores`).
        """
        import torch

        ids, pad = self._prepare(input_ids, attention_mask)
        b, length = ids.shape
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if length + max_new_tokens > self.config.max_positions:
            raise BucketError(
                f"a prompt of {length} tokens plus max_new_tokens={max_new_tokens} needs "
                f"{length + max_new_tokens} positions but the largest n_positions bucket is "
                f"{self.config.max_positions}; load the model with a larger n_positions or lower max_new_tokens"
            )
        eos = self._eos_ids(eos_token_id)
        pad_id = self._pad_id(pad_token_id, eos)
        if streamer is not None:
            streamer.put(torch.as_tensor(ids, dtype=torch.long))

        t0 = time.perf_counter()
        pad_dev = jnp.asarray(pad, jnp.int32)
        next_tok, logits = self._prefill(ids, pad)
        new: list[np.ndarray] = []
        scores: list[np.ndarray] = []
        done = np.zeros(b, bool)
        t_first = None
        for t in range(max_new_tokens):
            if t > 0:
                slot = length + t - 1
                window = buckets.pick(list(self.config.n_positions), slot + 1, "generation", "")
                next_tok, logits = self._run(next_tok[:, None], window, slot, pad_dev, 0)
            host = np.asarray(next_tok)
            if t_first is None:
                t_first = time.perf_counter()
            if output_scores:
                scores.append(np.asarray(logits))
            host = np.where(done, pad_id, host)
            new.append(host)
            if streamer is not None:
                streamer.put(torch.as_tensor(host, dtype=torch.long))
            done |= np.isin(host, eos)
            if done.all():
                break
        t_end = time.perf_counter()
        if streamer is not None:
            streamer.end()
        prompt = _as_int_array(input_ids, "input_ids")  # the caller's ids, padding included, like HF
        seq = torch.as_tensor(np.concatenate([prompt, np.stack(new, 1)], 1), dtype=torch.long)
        if not return_dict:
            return seq
        timings = {"first_token_s": t_first - t0, "total_s": t_end - t0, "new_tokens": len(new), "prompt_tokens": length}
        return GenerateOutput(seq, scores if output_scores else None, timings)

    # ---- input checking ----------------------------------------------------------------------
    def _prepare(self, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
        ids = _as_int_array(input_ids, "input_ids")
        if ids.shape[1] == 0:
            raise InputError("input_ids is empty; give at least one prompt token")
        if ids.shape[0] != self.config.batch_size:
            raise InputError(
                f"got a batch of {ids.shape[0]} prompt(s) but the model was compiled for batch_size="
                f"{self.config.batch_size}; pass exactly that many rows or reload with batch_size={ids.shape[0]}"
            )
        if attention_mask is None:
            mask = np.ones_like(ids)
        else:
            mask = _as_int_array(attention_mask, "attention_mask")
            if mask.shape != ids.shape:
                raise InputError(f"attention_mask shape {mask.shape} differs from input_ids shape {ids.shape}")
        if (np.diff(mask, axis=1) < 0).any():
            raise InputError(
                "attention_mask is not left-padded (a 1 is followed by a 0); pad prompts on the left, "
                "e.g. tokenizer.padding_side = 'left'"
            )
        pad = ids.shape[1] - mask.sum(1)
        if (pad >= ids.shape[1]).any():
            raise InputError("a row of attention_mask is all zeros; every prompt needs at least one token")
        real = mask.astype(bool)
        bad = real & ((ids < 0) | (ids >= self.spec.vocab_size))
        if bad.any():
            raise InputError(
                f"token id {int(ids[bad][0])} is outside the vocabulary [0, {self.spec.vocab_size}); "
                "was the prompt encoded with this model's tokenizer?"
            )
        return np.where(real, ids, 0).astype(np.int32), pad.astype(np.int32)

    def _eos_ids(self, eos: int | Sequence[int] | None) -> np.ndarray:
        if eos is None and self.hf_config is not None:
            eos = getattr(self.hf_config, "eos_token_id", None)
        if eos is None:
            return np.zeros(0, np.int64)
        return np.atleast_1d(np.asarray(eos, np.int64))

    def _pad_id(self, pad: int | None, eos: np.ndarray) -> int:
        if pad is None and self.hf_config is not None:
            pad = getattr(self.hf_config, "pad_token_id", None)
        if pad is None:
            pad = int(eos[0]) if eos.size else 0
        return int(pad)

    @property
    def tokenizer(self):
        """The checkpoint's tokenizer (transformers), loaded on first use; None if it has none."""
        if self._tokenizer is None and self._tokenizer_loader is not None:
            self._tokenizer = self._tokenizer_loader()
        return self._tokenizer

    def __repr__(self) -> str:
        s, c = self.spec, self.config
        return (
            f"NxModel(family={self.family.name!r}, layers={s.n_layers}, hidden={s.hidden_size}, "
            f"batch_size={c.batch_size}, n_positions={list(c.n_positions)}, amp={c.amp!r}, backend={c.backend!r})"
        )


def _as_int_array(x: Any, name: str) -> np.ndarray:
    if type(x).__module__.startswith("torch"):
        x = x.detach().cpu().numpy()
    try:
        a = np.asarray(x)
    except (ValueError, TypeError) as exc:
        raise InputError(f"{name} must be a 2-D array of token ids (rows of equal length): {exc}") from exc
    if a.ndim == 1:
        a = a[None, :]
    if a.ndim != 2 or not (np.issubdtype(a.dtype, np.integer) or np.issubdtype(a.dtype, np.bool_) or a.size == 0):
        raise InputError(f"{name} must be a 2-D array of integer token ids, got shape {a.shape} dtype {a.dtype}")
    return a.astype(np.int64)
