"""`NxModel`: a loaded model, a thin facade over its parts.

- `placement` (`nx.placement.Placement`): devices, mesh, host <-> device copies;
- `params`: the weights on the devices, laid out for tensor parallelism;
- `kv` (`nx.kvcache.KVCache`): the on-device KV cache and which rows are in use;
- `programs` (`nx.programs.ProgramSet`): compiled programs by `ProgramKey`;
- sessions (`nx.session.Session`) advance batches through the programs; `nx.decoding` runs the
  Hugging Face-style loops over them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import numpy as np

from nx import artifacts, buckets, decoding, dump, executables, scan, sharding
from nx.buckets import ProgramKey
from nx.config import RuntimeConfig
from nx.decoding import GenerateOutput
from nx.family import Family
from nx.generation import SamplingParams
from nx.kvcache import KVCache
from nx.placement import Placement
from nx.programs import ProgramSet
from nx.quant import QuantizationConfig
from nx.session import Prompt, Session
from nx.spec import ModelSpec

__all__ = ["GenerateOutput", "NxModel", "RuntimeConfig"]


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
        quant: QuantizationConfig | None = None,
        prepared: bool = False,
    ) -> None:
        """`params` (a host numpy tree) is consumed while it is placed. `quant` stores 2-D weights
        as int8; ``prepared=True`` means `params` are already re-laid out and quantized (an artifact)."""
        self.family, self.spec, self.config, self.hf_config, self.quant = family, spec, config, hf_config, quant
        self._tokenizer_loader = tokenizer_loader
        self._tokenizer: Any = None
        sharding.check_degree(spec, config.tp_degree)
        self.unroll = scan.block_size(spec.n_layers, config.unroll)
        self.placement = Placement(config)
        self.params, self.param_specs = self.placement.place_params(params, spec, self.unroll, quant, prepared)
        self.kv = KVCache(spec, self.placement, config.batch_size, config.max_positions, self.unroll)
        self.programs = ProgramSet(spec, self.placement, self.params, self.param_specs, self.kv, self.unroll)
        self.programs.dump_to = os.environ.get(dump.ENV) or None
        #: The artifact directory this model was restored from (`nx.load(dir)`), else None.
        self.artifact_path: Any = None

    # ---- parts ---------------------------------------------------------------------------------
    @property
    def mesh(self):
        return self.placement.mesh

    @property
    def device(self):
        return self.placement.device

    @property
    def dtype(self):
        return self.placement.dtype

    @property
    def local_spec(self) -> ModelSpec:
        return self.programs.local_spec

    @property
    def caches(self) -> list[tuple[jax.Array, jax.Array]]:
        return self.kv.arrays

    @property
    def compile_cache(self):
        """Where compiled programs are looked up and stored (`nx.compile_cache`); None compiles each."""
        return self.programs.compile_cache

    @compile_cache.setter
    def compile_cache(self, cache) -> None:
        self.programs.compile_cache = cache

    @property
    def dump_to(self) -> str | None:
        """Directory receiving each program's HLO when it compiles (``NX_DUMP_TO``)."""
        return self.programs.dump_to

    @dump_to.setter
    def dump_to(self, directory: str | None) -> None:
        self.programs.dump_to = directory

    def put(self, a: Any) -> jax.Array:
        return self.placement.put(a)

    def host(self, a: jax.Array) -> np.ndarray:
        return self.placement.host(a)

    def layer_params(self) -> list[Any]:
        """The per-layer parameter trees (unstacking scanned blocks), as saved in artifacts."""
        return scan.unstack(self.params["layers"]) if self.unroll else self.params["layers"]

    # ---- programs ------------------------------------------------------------------------------
    def program_shapes(self) -> list[ProgramKey]:
        """The programs `compile()` builds: greedy prefill per prompt bucket, greedy decode per
        position bucket (sampling variants and chunked prefill compile on first use)."""
        return buckets.default_keys(self.config)

    def request_shapes(self, prompt_length: int, max_new_tokens: int, sample: bool = False) -> list[ProgramKey]:
        """The programs one request runs (``nx generate`` compiles only these); `BucketError` if it cannot fit."""
        return buckets.request_keys(self.config, prompt_length, max_new_tokens, sample)

    @property
    def compiled_shapes(self) -> list[ProgramKey]:
        """Keys of the programs compiled (or loaded) so far, in the order they were built."""
        return self.programs.keys

    def lower(self, rows: int, n_tokens: int, window: int, sample: bool = False):
        return self.programs.lower(ProgramKey(rows, n_tokens, window, sample))

    def executable(self, rows: int, n_tokens: int, window: int, sample: bool = False):
        return self.programs.get(ProgramKey(rows, n_tokens, window, sample))

    def compile(self, progress: bool | None = None, *, workers: int | None = None,
                shapes: Sequence[ProgramKey] | None = None, warm: bool = False) -> NxModel:
        """Compile every bucket's program now (or those of `shapes`), `workers` at a time; with
        `warm`, also run each once as soon as it is built."""
        self.programs.compile(self.program_shapes() if shapes is None else shapes, progress, workers=workers, warm=warm)
        return self

    def warmup(self, progress: bool | None = None, *, workers: int | None = None) -> NxModel:
        """Run every default program once (compiling any not yet compiled), so first requests do
        not pay XLA's first-call setup; programs warmed before are not run again."""
        return self.compile(progress, workers=workers, warm=True)

    def drop_programs(self) -> None:
        """Free every compiled program; each comes back (from the compile cache, if set) when needed."""
        self.programs.drop()

    # ---- generation ----------------------------------------------------------------------------
    def session(self, prompt: Prompt, sampling: SamplingParams | None = None) -> Session:
        """A session over every row of the KV cache for checked prompt rows (`nx.decoding.prepare`)."""
        return Session(self.programs, self.config, prompt, sampling or SamplingParams())

    def prepare(self, input_ids: Any, attention_mask: Any = None) -> Prompt:
        """Checked prompt rows from token ids and a left-padding attention mask."""
        return decoding.prepare(self, input_ids, attention_mask)

    def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """Next-token logits ``[batch, vocab]`` (f32) after the prompt: one prefill, no generation."""
        return decoding.logits(self, input_ids, attention_mask)

    def forced_logits(self, input_ids: Any, continuation: Any, attention_mask: Any = None) -> np.ndarray:
        """Teacher forcing: logits ``[batch, n + 1, vocab]`` after the prompt and after each of the
        `n` tokens of `continuation`, whatever the model itself would have chosen."""
        return decoding.forced_logits(self, input_ids, continuation, attention_mask)

    def stream(self, input_ids: Any, attention_mask: Any = None, **kwargs) -> Iterator[np.ndarray]:
        """Like `generate`, but yields each step's new tokens ``[batch]`` as soon as it exists."""
        return decoding.stream(self, input_ids, attention_mask, **kwargs)

    def generate(self, input_ids: Any, attention_mask: Any = None, max_new_tokens: int = 32, **kwargs: Any):
        """Generate HF style; returns a ``torch.LongTensor [batch, prompt + new]``.

        Knobs use Hugging Face's names: `do_sample`, `temperature`, `top_k`, `top_p`,
        `repetition_penalty`, `min_new_tokens`, `max_new_tokens`, `eos_token_id`, `pad_token_id`,
        plus `seed` (same seed, same tokens) and `stop` (token-id sequences that end a row).
        Prompts in a batch are left-padded (``attention_mask`` 0 on padding). A row stops at EOS
        or a stop sequence and is padded afterwards; the loop ends when every row is done.
        `streamer` takes HF streamer objects (``put``/``end``). With `return_dict` the result is a
        `GenerateOutput` (raw per-step logits in `scores` if `output_scores`).
        """
        return decoding.generate(self, input_ids, attention_mask, max_new_tokens, **kwargs)

    def save(self, directory: Any, *, sampling: bool = False, serving: bool = False, progress: bool | None = None,
             workers: int | None = None) -> Path:
        """Save weights (as the programs take them), compiled programs, tokenizer, HF config and a
        manifest; ``nx.load(directory)`` then runs without the checkpoint and without compiling.

        Every greedy program a prompt of any length up to the largest position bucket runs is
        compiled first if it is not yet (`buckets.all_keys`: long prompts run in chunks over larger
        windows), so the artifact never compiles for a greedy request; ``sampling=True`` adds the
        sampling variants, ``serving=True`` the programs `nx.Engine` / ``nx serve`` run. Programs
        compiled on demand before are saved too."""
        out = artifacts.prepare_directory(directory)
        keys = buckets.all_keys(self.config) + (buckets.serving_keys(self.config) if serving else [])
        if sampling:
            keys += [k._replace(sample=True) for k in keys]
        self.compile(progress, workers=workers, shapes=keys)
        fam, cfg = self.family, self.config
        header = {
            "environment": executables.environment(self.placement.devices),
            "family": fam.name,
            "plugin": {"distribution": fam.distribution, "version": fam.version},
            "spec": self.spec,
            "runtime": cfg,
            "buckets": {"n_positions": cfg.n_positions, "context_length_estimate": cfg.context_buckets},
            "quant": self.quant.to_dict() if self.quant is not None else None,
        }
        programs = [(key, exe.to_bytes(), exe.signature) for key, exe in self.programs.items()]
        return artifacts.write(out, programs=programs, params={**self.params, "layers": self.layer_params()},
                               hf_config=self.hf_config, tokenizer=self.tokenizer, header=header)

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
            f"batch_size={c.batch_size}, n_positions={list(c.n_positions)}, amp={c.amp!r}, "
            f"{f'kv_dtype={c.kv_dtype!r}, ' if c.kv_dtype else ''}backend={c.backend!r}, "
            f"tp_degree={c.tp_degree})"
        )
