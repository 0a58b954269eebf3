"""`NxModel`: a loaded model with its compiled programs, KV cache and generation loop.

Two kinds of program per model, each compiled once per bucket: context encoding (prefill of up
to C prompt tokens, chunked for longer prompts) and token generation (one token per row over P
cache positions). Both take ``(params, caches, inputs, sampling)`` and return
``(next_tokens, logits, caches, seen)`` with the caches donated, so XLA updates them in place.
Token choice (greedy or sampling) happens inside the program; only token ids cross to the host.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nx import buckets, decoder, dump, inputs, memory, ops, scan, sharding, xla_options
from nx.compile_cache import CompileCache
from nx.errors import BucketError, ConfigError, InputError
from nx.family import Family
from nx.generation import GenerationOptions, SamplingParams, hits_stop
from nx.ops.quant import is_quantized
from nx.progress import track
from nx.quant import quantize_params
from nx.sampling import SamplingInputs, choose
from nx.spec import ModelSpec

AMP_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


@dataclass(frozen=True)
class RuntimeConfig:
    """How a model is compiled: batch sizes, buckets, compute dtype and backend."""

    batch_size: int = 1
    n_positions: tuple[int, ...] = (128, 256, 512, 1024)
    context_buckets: tuple[int, ...] = (16, 32, 64, 128, 256, 512, 1024)
    amp: str = "f32"
    backend: str = "cpu"
    prompt_batch_size: int = 1
    tp_degree: int = 1
    devices: tuple[int, ...] | None = None  # device ids to run on (default: the first tp_degree)
    unroll: int | None = None  # layers per scanned block (None: every layer unrolled; see nx.scan)

    @classmethod
    def build(
        cls,
        batch_size: int = 1,
        n_positions: int | Sequence[int] = 1024,
        context_length_estimate: int | Sequence[int] | None = None,
        amp: str = "f32",
        backend: str = "cpu",
        prompt_batch_size: int | None = None,
        tp_degree: int = 1,
        devices: Sequence[int] | None = None,
        unroll: int | None = None,
    ) -> RuntimeConfig:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ConfigError(f"batch_size must be a positive int, got {batch_size!r}")
        pbs = batch_size if prompt_batch_size is None else prompt_batch_size
        if not isinstance(pbs, int) or pbs < 1 or batch_size % pbs:
            raise ConfigError(
                f"prompt_batch_size={prompt_batch_size!r} must be a positive divisor of batch_size={batch_size}"
            )
        if amp not in AMP_DTYPES:
            raise ConfigError(f"amp must be one of {sorted(AMP_DTYPES)}, got {amp!r}")
        if not isinstance(tp_degree, int) or tp_degree < 1:
            raise ConfigError(f"tp_degree must be a positive int, got {tp_degree!r}")
        if devices is not None:
            devices = tuple(int(d) for d in devices)
            if len(devices) != tp_degree or len(set(devices)) != len(devices):
                raise ConfigError(f"devices={list(devices)} must name tp_degree={tp_degree} distinct device ids")
        pos = buckets.position_buckets(n_positions)
        ctx = buckets.context_buckets(context_length_estimate, pos)
        return cls(batch_size, tuple(pos), tuple(ctx), amp, backend, pbs, tp_degree, devices, unroll)

    @property
    def max_positions(self) -> int:
        return self.n_positions[-1]

    @property
    def broadcast(self) -> int:
        """Output rows per prompt row (context broadcasting)."""
        return self.batch_size // self.prompt_batch_size


@dataclass
class GenerateOutput:
    """`sequences` ``[batch, prompt + new]`` (torch.long), raw per-step `scores` if asked, timings."""

    sequences: Any
    scores: list[np.ndarray] | None = None
    timings: dict[str, float] = field(default_factory=dict)


def _program(model: NxModel, window: int, sample: bool):
    spec, local, tp = model.spec, model.local_spec, model.config.tp_degree

    def forward(params, caches, inp):
        axis = sharding.AXIS if tp > 1 else None
        return decoder.step(local, params, caches, inp, window, axis, spec.vocab_size, model.unroll)

    if tp > 1:
        cache_specs = _per_cache(model, model.cache_spec)
        forward = jax.shard_map(
            forward,
            mesh=model.mesh,
            in_specs=(model.param_specs, cache_specs, P()),
            out_specs=(P(), cache_specs),
            check_vma=False,  # logits are all-gathered, hence identical on every shard
        )

    # f32 means f32: GPUs would otherwise run f32 matmuls in TF32 and drift from the reference.
    precision = "highest" if model.config.amp == "f32" else "default"

    def run(params, caches, inp: decoder.StepInputs, smp: SamplingInputs):
        with jax.default_matmul_precision(precision):
            logits, caches = forward(params, caches, inp)
        key = jax.random.key_data(jax.random.fold_in(jax.random.wrap_key_data(smp.key), inp.slot))
        tokens, seen = choose(logits, smp._replace(key=key), sample)
        return tokens, logits, caches, seen

    # Pinned output shardings: the caches come back exactly as they went in, so a program lowered
    # after a run is the same program (on one device XLA would otherwise hand them back replicated,
    # a different lowering and so a different compile-cache key).
    rep, kv = model._replicated, NamedSharding(model.mesh, model.cache_spec)
    out_shardings = (rep, rep, _per_cache(model, kv), rep)
    return jax.jit(run, donate_argnums=(1,), out_shardings=out_shardings)


def _per_cache(model: NxModel, leaf: Any) -> list[tuple[Any, Any]]:
    """`leaf` (a partition spec or sharding) for the K and V cache of every layer pair."""
    return [(leaf, leaf)] * len(model.caches)


def _row_gather(model: NxModel) -> Callable:
    """A program taking every layer's caches and ``rows [batch]`` to the caches with batch row i
    copied from row ``rows[i]``. Cache rows are ``kv_heads x batch`` (head-major; a scanned
    block's stacked caches have a leading layer axis) and each device gathers its own heads."""
    batch_axis = 1 if model.unroll else 0

    def gather(caches, rows):
        def one(c):
            lead = c.shape[:batch_axis]
            grouped = c.reshape(*lead, -1, rows.shape[0], *c.shape[batch_axis + 1 :])
            return jnp.take(grouped, rows, axis=batch_axis + 1).reshape(c.shape)

        return jax.tree.map(one, caches)

    if model.config.tp_degree > 1:
        cache_specs = _per_cache(model, model.cache_spec)
        gather = jax.shard_map(gather, mesh=model.mesh, in_specs=(cache_specs, P()), out_specs=cache_specs)
    return jax.jit(gather, donate_argnums=(0,), out_shardings=_per_cache(model, NamedSharding(model.mesh, model.cache_spec)))


@dataclass
class _Run:
    """Device-side state of one in-flight batch between program calls."""

    slot: int  # cache position the next fed token is written to
    pad: jax.Array  # [batch] leading padding of each row
    sampling: SamplingInputs
    sample: bool


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
        quant: Any = None,
        prepared: bool = False,
    ) -> None:
        """`quant` (an `nx.QuantizationConfig`) stores 2-D weights as int8 (quantized here, after the
        tensor-parallel re-layout); ``prepared=True`` means `params` are already re-laid out and
        quantized (restoring a saved artifact), so they are only placed on the devices. `params`
        (a numpy tree) is consumed: its containers are emptied and each array is released once on
        the devices, so the host never holds a second copy of the model."""
        self.family = family
        self.quant = quant
        self.spec = spec
        self.config = config
        self.hf_config = hf_config
        self._tokenizer_loader = tokenizer_loader
        self._tokenizer: Any = None
        self.dtype = AMP_DTYPES[config.amp]
        tp = config.tp_degree
        sharding.check_degree(spec, tp)
        self.local_spec = sharding.local_spec(spec, tp)
        self.mesh = Mesh(np.array(select_devices(config)), (sharding.AXIS,))
        self.device = self.mesh.devices.flat[0]
        self._replicated = NamedSharding(self.mesh, P())
        self.unroll = scan.block_size(spec.n_layers, config.unroll)
        self.cache_spec = P(*([None] * (1 if self.unroll else 0)), sharding.AXIS, None, None)  # whole kv heads
        params = _take(params)  # the caller's tree is emptied: host weights are freed as they are placed
        if not prepared:
            params = sharding.relayout(params, spec, tp)
            if quant is not None:
                params = quantize_params(params, quant, config.amp, config.backend)
        names = sharding.tree_names(params)
        self.param_specs = jax.tree.map(lambda n, a: sharding.partition_spec(n, a.ndim), names, params)
        if self.unroll:
            params["layers"] = scan.stack(params["layers"], self.unroll)
            self.param_specs["layers"] = scan.stack_specs(self.param_specs["layers"], self.unroll)
        leaves, tree = jax.tree.flatten(params, is_leaf=is_quantized)
        del params  # `leaves` is now the only holder of the host arrays
        placed = []
        for i, where in enumerate(tree.flatten_up_to(self.param_specs)):
            a, leaves[i] = self._cast(leaves[i]), None  # peak host memory: one tensor, not the model
            placed.append(jax.tree.map(lambda x, ps: self._place(x, NamedSharding(self.mesh, ps)), a, where))
            del a
            memory.return_freed_memory()
        self.params = tree.unflatten(placed)
        self.caches = self._new_caches()
        self._executables: dict[tuple[int, int, int, bool], Any] = {}
        self._warmed: set[tuple[int, int, int, bool]] = set()  # programs `warmup` has run
        self._run_lock = threading.Lock()
        self._gather_rows: Callable | None = None  # `_reorder`'s program, built on first use
        #: The artifact directory this model was restored from (`nx.load(dir)`), else None.
        self.artifact_path: Any = None
        #: Directory receiving each program's HLO (text and HloModuleProto) when it compiles.
        self.dump_to: str | None = os.environ.get(dump.ENV) or None
        #: Where compiled programs are looked up and stored (`nx.compile_cache`; `nx.load` sets it);
        #: None compiles each.
        self.compile_cache: CompileCache | None = None

    def _cast(self, a: np.ndarray):
        if is_quantized(a):  # int8 values and f32 scales stay as they are
            return a
        out = a.astype(self.dtype, copy=False) if np.issubdtype(a.dtype, np.floating) else a
        # Place arrays that own their memory: handed a view (of a dequantized GGUF buffer, of a
        # mapped file), the CPU backend kept its base alive next to the placed copy (measured
        # +140 MB resident and a +300 MB peak when loading SmolLM2's GGUF).
        return out if out.flags.owndata else out.copy()

    @staticmethod
    def _place(a: np.ndarray, where: NamedSharding) -> jax.Array:
        """Put a host array on the mesh; each process supplies only the shards it holds."""
        return jax.make_array_from_callback(a.shape, where, lambda idx: a[idx])

    def _put(self, a: Any) -> jax.Array:
        """A small host value, replicated over the mesh (the program inputs)."""
        return self._place(np.asarray(a), self._replicated)

    @staticmethod
    def _host(a: jax.Array) -> np.ndarray:
        """A replicated device value on the host (works across processes too)."""
        return np.asarray(a.addressable_data(0))

    def _new_caches(self) -> list[tuple[jax.Array, jax.Array]]:
        s, tp = self.spec, self.config.tp_degree
        shapes = ops.cache_shapes(self.config.batch_size, self.config.max_positions, sharding.cache_kv_heads(s, tp), s.head_dim)
        pairs = s.n_layers
        if self.unroll:  # one stacked pair per layer of a scanned block
            shapes, pairs = tuple((s.n_layers // self.unroll, *shape) for shape in shapes), self.unroll
        where = NamedSharding(self.mesh, self.cache_spec)
        stored = ops.cache_dtype(self.dtype)  # 16-bit floats as their uint16 bits (see nx.ops.attention)
        zeros = jax.jit(lambda: tuple(jnp.zeros(shape, stored) for shape in shapes), out_shardings=(where, where))
        return [zeros() for _ in range(pairs)]

    def layer_params(self) -> list[Any]:
        """The per-layer parameter trees (unstacking scanned blocks), as saved in artifacts."""
        return scan.unstack(self.params["layers"]) if self.unroll else self.params["layers"]

    # ---- compilation -------------------------------------------------------------------------
    def program_shapes(self) -> list[tuple[int, int, int, bool]]:
        """(rows, tokens, window, sample) of the programs `compile()` builds: greedy prefill per
        context bucket and greedy decode per position bucket. Sampling variants and chunked
        prefill of over-long prompts compile on first use."""
        pb, b = self.config.prompt_batch_size, self.config.batch_size
        pos = list(self.config.n_positions)
        # a prompt chunk of c tokens runs over the smallest position bucket holding it (as `_start` picks)
        return [(pb, c, buckets.pick(pos, c, "", ""), False) for c in self.config.context_buckets] + [
            (b, 1, p, False) for p in self.config.n_positions
        ]

    @property
    def compiled_shapes(self) -> list[tuple[int, int, int, bool]]:
        """Keys of the programs compiled (or loaded) so far, in the order they were built."""
        return list(self._executables)

    def drop_programs(self) -> None:
        """Forget every compiled program and free its memory; each is built again (from the
        compile cache, if one is set) when next needed. Weights and KV caches stay."""
        with self._run_lock:
            self._executables.clear()
            self._warmed.clear()

    def _abstract_inputs(self, rows: int, n_tokens: int) -> tuple[decoder.StepInputs, SamplingInputs]:
        b, v = self.config.batch_size, self.spec.vocab_size
        rep = self._replicated

        def sds(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

        i32, f32 = jnp.int32, jnp.float32
        inp = decoder.StepInputs(sds((rows, n_tokens), i32), sds((), i32), sds((rows,), i32), sds((), i32))
        key = jax.random.key_data(jax.random.key(0))
        smp = SamplingInputs(
            sds((b,), f32), sds((b,), i32), sds((b,), f32), sds((), f32), sds((b, v), jnp.bool_), sds((v,), jnp.bool_),
            sds(key.shape, key.dtype),
        )
        return inp, smp

    def lower(self, rows: int, n_tokens: int, window: int, sample: bool = False):
        """The lowered (not yet compiled) program: `rows` x `n_tokens` tokens over `window` positions."""
        fn = _program(self, window, sample)
        return fn.lower(self.params, self.caches, *self._abstract_inputs(rows, n_tokens))

    def executable(self, rows: int, n_tokens: int, window: int, sample: bool = False):
        key = (rows, n_tokens, window, sample)
        if key not in self._executables:
            lowered = self.lower(*key)
            options = xla_options.compiler_options(self.device.platform)
            if self.dump_to:
                dump.dump_lowered(lowered, self.dump_to, dump.program_name(*key), options)
            cache = self.compile_cache
            self._executables[key] = lowered.compile(options) if cache is None else cache.compile(lowered, options, self)
        return self._executables[key]

    def compile(
        self,
        progress: bool | None = None,
        *,
        workers: int | None = None,
        shapes: Sequence[tuple[int, int, int, bool]] | None = None,
        warm: bool = False,
    ) -> NxModel:
        """Compile every bucket's program now (otherwise each compiles on first use), or the
        programs of `shapes` ((rows, tokens, window, sample) keys), `workers` at a time; with
        `warm`, also run each once as soon as it is built (see `warmup`).

        Threads help because XLA compiles outside the GIL: SmolLM2's 11 default programs take
        13.2 s with 2 workers against 17.5 s one at a time on 2 cores. `workers` defaults to
        `xla_options.default_workers()`. A program found in `compile_cache` is loaded instead of
        compiled. Warm-up runs take turns on the model's KV cache but overlap the other workers'
        compiles. Compiling leaves freed memory in the heap, which is then handed back to the OS
        (~55 MB here, ~120 MB with 2 workers).
        """
        from concurrent.futures import ThreadPoolExecutor, as_completed

        wanted = dict.fromkeys(self.program_shapes() if shapes is None else shapes)
        todo = [s for s in wanted if s not in self._executables or (warm and s not in self._warmed)]
        if not todo:
            return self

        def build(shape):
            self.executable(*shape)
            if warm:
                self._warm(shape)

        what = ("compiling and warming up" if warm else "compiling") + f" {len(todo)} programs"
        with ThreadPoolExecutor(max_workers=max(1, workers or xla_options.default_workers())) as pool:
            done = as_completed([pool.submit(build, shape) for shape in todo])  # distinct keys
            for fut in track(done, what, total=len(todo), enabled=progress):
                fut.result()
        memory.return_freed_memory()
        return self

    def warmup(self, progress: bool | None = None, *, workers: int | None = None) -> NxModel:
        """Run every program `compile()` builds once on placeholder tokens (compiling any not yet
        compiled, in parallel with the runs), so that the first requests do not pay the programs'
        first-call setup. Programs warmed before are not run again.

        XLA:CPU prepares each of a program's YNNPACK matmuls on its first call: on SmolLM2-135M a
        128-token prefill takes ~0.6 s the first time and ~0.14 s after, a decode step ~70 then 26
        ms. The placeholder keys and values this leaves in the KV cache are never read: a request
        writes every cache slot it attends to before attending.
        """
        return self.compile(progress, workers=workers, warm=True)

    def _warm(self, shape: tuple[int, int, int, bool]) -> None:
        """One run of a compiled program on placeholder tokens (callable from several threads)."""
        rows, n, window, sample = shape
        pb = self.config.prompt_batch_size
        with self._run_lock:  # the calls donate and replace self.caches
            run = self._new_run(np.zeros((pb, 1), np.int64), np.zeros(pb, np.int64), SamplingParams(do_sample=sample))
            pad = self._put(np.zeros(rows, np.int32))
            tokens, _, _ = self._call(run, np.zeros((rows, n), np.int32), window, 0, pad, n - 1)
            jax.block_until_ready(tokens)
        self._warmed.add(shape)

    # ---- one batch, step by step -------------------------------------------------------------
    def _call(self, run: _Run, tokens, window: int, slot: int, pad, last: int, suppress=None):
        rows, n = tokens.shape
        exe = self.executable(rows, n, window, run.sample)
        if isinstance(tokens, np.ndarray):
            tokens = self._put(tokens.astype(np.int32))
        inp = decoder.StepInputs(tokens, self._put(np.int32(slot)), pad, self._put(np.int32(last)))
        smp = run.sampling if suppress is None else run.sampling._replace(suppress=suppress)
        tokens, logits, self.caches, seen = exe(self.params, self.caches, inp, smp)
        return tokens, logits, seen

    def _start(self, ids: np.ndarray, pad: np.ndarray, sp: SamplingParams, suppress=None):
        """Encode the prompts (chunked when longer than the largest context bucket) and choose
        the first new token. Returns (run state, first tokens, logits)."""
        rows, length = ids.shape
        self._check_prompt_fits(length)
        run = self._new_run(ids, pad, sp)
        pad_dev = self._put(pad.astype(np.int32))
        for start, c, window in self._prompt_chunks(length):
            chunk = np.zeros((rows, c), np.int32)
            n = min(c, length - start)
            chunk[:, :n] = ids[:, start : start + n]
            final = start + c >= length
            tokens, logits, seen = self._call(
                run, chunk, window, start, pad_dev, (length - 1 - start) if final else c - 1, suppress
            )
        run.sampling = run.sampling._replace(seen=seen)
        run.slot = length
        return run, tokens, logits

    def _prompt_chunks(self, length: int) -> Iterator[tuple[int, int, int]]:
        """(start, tokens, window) of each program call that encodes a `length`-token prompt: one
        context bucket, or chunks of the largest one for longer prompts (the last chunk starts early
        enough to fit the cache, re-encoding a few tokens rather than overflowing it)."""
        cfg = self.config
        start = 0
        while True:
            c = min(buckets.pick(list(cfg.context_buckets), min(length - start, cfg.context_buckets[-1]), "", ""),
                    cfg.max_positions)
            start = min(start, cfg.max_positions - c)
            yield start, c, buckets.pick(list(cfg.n_positions), start + c, "", "")
            if start + c >= length:
                return
            start += c

    def _decode_windows(self, length: int, max_new_tokens: int) -> list[int]:
        """The position buckets the decode steps after a `length`-token prompt use: the step that
        writes slot s attends over the smallest bucket holding s + 1 positions; the last new token
        is never fed back."""
        pos = list(self.config.n_positions)
        return sorted({buckets.pick(pos, s + 1, "", "") for s in range(length, length + max_new_tokens - 1)})

    def request_shapes(self, prompt_length: int, max_new_tokens: int, sample: bool = False) -> list[tuple[int, int, int, bool]]:
        """The programs ((rows, tokens, window, sample) keys, as `compile(shapes=...)` takes) that
        generating `max_new_tokens` after a `prompt_length`-token prompt runs. ``nx generate``
        compiles only these: a one-off request needs one or two of the default eleven programs,
        and a sampled one none of the greedy ones. Raises `BucketError` if the request cannot fit."""
        self._check_prompt_fits(prompt_length)
        self._check_total_fits(prompt_length, max_new_tokens, f"max_new_tokens={max_new_tokens}", "lower max_new_tokens")
        pb, b = self.config.prompt_batch_size, self.config.batch_size
        prefill = [(pb, c, window, sample) for _, c, window in self._prompt_chunks(prompt_length)]
        decode = [(b, 1, window, sample) for window in self._decode_windows(prompt_length, max_new_tokens)]
        return list(dict.fromkeys(prefill + decode))

    def _check_prompt_fits(self, length: int) -> None:
        if length > self.config.max_positions:
            raise BucketError(
                f"a prompt of {length} tokens is longer than the largest n_positions bucket "
                f"{self.config.max_positions}; load the model with a larger n_positions"
            )

    def _check_total_fits(self, length: int, extra: int, what: str, hint: str) -> None:
        """The prompt plus `extra` more positions must fit the largest position bucket."""
        if length + extra > self.config.max_positions:
            raise BucketError(
                f"a prompt of {length} tokens plus {what} needs {length + extra} positions but the largest "
                f"n_positions bucket is {self.config.max_positions}; load the model with a larger n_positions "
                f"or {hint}"
            )

    def _new_run(self, ids: np.ndarray, pad: np.ndarray, sp: SamplingParams) -> _Run:
        b, v, rep = self.config.batch_size, self.spec.vocab_size, self.config.broadcast
        seen = np.zeros((b, v), bool)
        rows = np.repeat(np.arange(ids.shape[0]), rep)
        real = np.arange(ids.shape[1])[None, :] >= np.repeat(pad, rep)[:, None]
        r, c = np.nonzero(real)
        seen[r, ids[rows[r], c]] = True
        key = np.asarray(jax.random.key_data(jax.random.key(sp.seed_or_random())))
        smp = SamplingInputs(
            self._put(np.full((b,), sp.temperature, np.float32)),
            self._put(np.full((b,), sp.top_k or 0, np.int32)),
            self._put(np.full((b,), sp.top_p, np.float32)),
            self._put(np.float32(sp.repetition_penalty)),
            self._put(seen),
            self._put(np.zeros((v,), bool)),
            self._put(key),
        )
        return _Run(0, self._put(np.repeat(pad, rep).astype(np.int32)), smp, sp.do_sample)

    def _next(self, run: _Run, tokens: jax.Array, suppress=None):
        """Feed one token per row; returns (next tokens, logits)."""
        window = buckets.pick(
            list(self.config.n_positions), run.slot + 1, "generation", "load the model with a larger n_positions"
        )
        tokens, logits, seen = self._call(run, tokens[:, None], window, run.slot, run.pad, 0, suppress)
        run.sampling = run.sampling._replace(seen=seen)
        run.slot += 1
        return tokens, logits

    def _reorder(self, run: _Run, rows: np.ndarray) -> None:
        """Make batch row i continue what row ``rows[i]`` held so far (beam search keeps some
        beams, duplicates others): gathers the KV caches, the padding and the seen-token masks
        instead of encoding the reordered sequences again."""
        rows = np.asarray(rows, np.int32)
        if self._gather_rows is None:
            self._gather_rows = _row_gather(self)
        with self._run_lock:
            self.caches = self._gather_rows(self.caches, self._put(rows))
        # small per-row inputs go through the host, so they stay placed as every program expects
        run.pad = self._put(self._host(run.pad)[rows])
        run.sampling = run.sampling._replace(seen=self._put(self._host(run.sampling.seen)[rows]))

    # ---- public API --------------------------------------------------------------------------
    def logits(self, input_ids: Any, attention_mask: Any = None) -> np.ndarray:
        """Next-token logits ``[batch, vocab]`` (f32) after the prompt: one prefill, no generation."""
        ids, pad = self._prepare(input_ids, attention_mask)
        _, _, logits = self._start(ids, pad, SamplingParams())
        return self._host(logits)

    def forced_logits(self, input_ids: Any, continuation: Any, attention_mask: Any = None) -> np.ndarray:
        """Teacher forcing: logits ``[batch, n + 1, vocab]`` (f32) after the prompt and after each of
        the `n` tokens of `continuation` ``[batch, n]``, fed one decode step at a time (whatever
        the model itself would have chosen). Compares models position by position cheaply."""
        ids, pad = self._prepare(input_ids, attention_mask)
        cont = inputs.token_array(continuation, "continuation")
        inputs.check_vocabulary(cont, self.spec.vocab_size, "continuation")
        if cont.shape[0] != self.config.batch_size:
            raise InputError(f"continuation has {cont.shape[0]} rows but the model decodes batch_size={self.config.batch_size}")
        self._check_total_fits(ids.shape[1], cont.shape[1], f"a continuation of {cont.shape[1]} tokens", "shorten it")
        run, _, logits = self._start(ids, pad, SamplingParams())
        out = [self._host(logits)]
        for t in range(cont.shape[1]):
            _, logits = self._next(run, cont[:, t].astype(np.int32))
            out.append(self._host(logits))
        return np.stack(out, axis=1)

    def stream(self, input_ids: Any, attention_mask: Any = None, **kwargs) -> Iterator[np.ndarray]:
        """Like `generate`, but yields each step's new tokens ``[batch]`` as soon as it exists."""
        _check_generate_options(NxModel.stream, kwargs)
        for host, _ in self._generate_steps(input_ids, attention_mask, **kwargs):
            yield host

    def generate(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        max_new_tokens: int = 32,
        *,
        streamer: Any = None,
        output_scores: bool = False,
        return_dict: bool = False,
        **kwargs: Any,
    ):
        """Generate HF style; returns a ``torch.LongTensor [batch, prompt + new]``.

        Knobs use Hugging Face's names: `do_sample`, `temperature`, `top_k`, `top_p`,
        `repetition_penalty`, `min_new_tokens`, `max_new_tokens`, `eos_token_id`, `pad_token_id`,
        plus `seed` (same seed, same tokens) and `stop` (token-id sequences that end a row).
        Prompts in a batch are left-padded (``attention_mask`` 0 on padding). A row stops at EOS
        or a stop sequence and is padded afterwards; the loop ends when every row is done.
        `streamer` takes HF streamer objects (``put``/``end``). With `return_dict` the result is a
        `GenerateOutput` (raw per-step logits in `scores` if `output_scores`).
        """
        import torch

        _check_generate_options(NxModel.generate, kwargs)
        GenerationOptions.check(
            max_new_tokens=max_new_tokens, streamer=streamer, output_scores=output_scores, return_dict=return_dict, **kwargs
        )  # before the streamer sees the prompt
        prompt = inputs.token_array(input_ids, "input_ids")
        rep = self.config.broadcast
        if streamer is not None:
            streamer.put(torch.as_tensor(np.repeat(prompt, rep, axis=0)))
        t0 = time.perf_counter()
        new, scores, t_first = [], [], None
        for host, logits in self._generate_steps(input_ids, attention_mask, max_new_tokens, **kwargs):
            t_first = t_first or time.perf_counter()
            new.append(host)
            if output_scores:
                scores.append(self._host(logits))
            if streamer is not None:
                streamer.put(torch.as_tensor(host, dtype=torch.long))
        t_end = time.perf_counter()
        if streamer is not None:
            streamer.end()
        seq = torch.as_tensor(np.concatenate([np.repeat(prompt, rep, axis=0), np.stack(new, 1)], 1), dtype=torch.long)
        if not return_dict:
            return seq
        timings = {
            "first_token_s": t_first - t0,
            "total_s": t_end - t0,
            "new_tokens": len(new),
            "prompt_tokens": prompt.shape[1],
        }
        return GenerateOutput(seq, scores if output_scores else None, timings)

    def _generate_steps(
        self,
        input_ids: Any,
        attention_mask: Any = None,
        max_new_tokens: int = 32,
        min_new_tokens: int = 0,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: int | None = 50,
        top_p: float = 1.0,
        repetition_penalty: float = 1.0,
        seed: int | None = None,
        eos_token_id: int | Sequence[int] | None = None,
        pad_token_id: int | None = None,
        stop: Sequence[int] | Sequence[Sequence[int]] | None = None,
    ) -> Iterator[tuple[np.ndarray, jax.Array]]:
        opts = GenerationOptions.check(
            max_new_tokens=max_new_tokens, min_new_tokens=min_new_tokens, do_sample=do_sample, temperature=temperature,
            top_k=top_k, top_p=top_p, repetition_penalty=repetition_penalty, seed=seed, eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, stop=stop,
        )
        sp, max_new_tokens, min_new_tokens = opts.sampling, opts.max_new_tokens, opts.min_new_tokens
        ids, pad = self._prepare(input_ids, attention_mask)
        length = ids.shape[1]
        self._check_prompt_fits(length)
        self._check_total_fits(length, max_new_tokens, f"max_new_tokens={max_new_tokens}", "lower max_new_tokens")
        eos = self._eos_ids(opts.eos_token_id)
        pad_id = self._pad_id(opts.pad_token_id, eos)
        stops = opts.stops
        ban = np.zeros(self.spec.vocab_size, bool)
        ban[eos[(eos >= 0) & (eos < self.spec.vocab_size)]] = True
        ban_eos, no_ban = self._put(ban), self._put(np.zeros_like(ban))

        b = self.config.batch_size
        done = np.zeros(b, bool)
        rows: list[list[int]] = [[] for _ in range(b)]
        run, tokens, logits = self._start(ids, pad, sp, ban_eos if min_new_tokens > 0 else None)
        for t in range(max_new_tokens):
            # Queue step t+1 before waiting for step t's tokens: it reads them on the device, so its
            # dispatch and this loop's host work overlap step t's execution. When the rows finish
            # early, that one queued step is computed and discarded.
            queued = None
            if t + 1 < max_new_tokens:
                queued = self._next(run, tokens, ban_eos if t + 1 < min_new_tokens else no_ban)
            host = np.where(done, pad_id, self._host(tokens))
            yield host, logits
            if queued is not None:
                tokens, logits = queued
            done |= np.isin(host, eos)
            if stops:
                for r in range(b):
                    rows[r].append(int(host[r]))
                    done[r] |= hits_stop(rows[r], stops)
            if done.all():
                return

    # ---- input checking ----------------------------------------------------------------------
    def _prepare(self, input_ids: Any, attention_mask: Any) -> tuple[np.ndarray, np.ndarray]:
        knob = "prompt_batch_size" if self.config.broadcast > 1 else "batch_size"
        return inputs.prompts(input_ids, attention_mask, self.spec.vocab_size, self.config.prompt_batch_size, knob)

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

    def save(self, directory: Any, *, sampling: bool = False, progress: bool | None = None, workers: int | None = None):
        """Save weights (as the programs take them), compiled programs, tokenizer, HF config and a
        manifest to `directory`; ``nx.load(directory)`` then serves without the checkpoint and
        without compiling. See `nx.artifacts.save`."""
        from nx import artifacts

        return artifacts.save(self, directory, sampling=sampling, progress=progress, workers=workers)

    def __repr__(self) -> str:
        s, c = self.spec, self.config
        return (
            f"NxModel(family={self.family.name!r}, layers={s.n_layers}, hidden={s.hidden_size}, "
            f"batch_size={c.batch_size}, n_positions={list(c.n_positions)}, amp={c.amp!r}, backend={c.backend!r}, "
            f"tp_degree={c.tp_degree})"
        )


def _take(tree: Any) -> Any:
    """A copy of the dict/list skeleton of `tree` (same leaves); the original containers are emptied,
    so the leaves live on only in the copy."""
    if isinstance(tree, dict):
        out = {k: _take(v) for k, v in tree.items()}
        tree.clear()
        return out
    if isinstance(tree, list):
        out = [_take(v) for v in tree]
        tree.clear()
        return out
    return tree


def select_devices(config: RuntimeConfig) -> list:
    """The devices a model runs on: `config.devices` by id, else the first `tp_degree` ones."""
    try:
        available = jax.devices(config.backend)
    except RuntimeError as exc:
        raise ConfigError(f"backend {config.backend!r} is not available here ({exc}); use backend='cpu'") from exc
    by_id = {d.id: d for d in available}
    if config.devices is not None:
        missing = [i for i in config.devices if i not in by_id]
        if missing:
            raise ConfigError(f"devices {missing} do not exist on backend {config.backend!r}; available ids: {sorted(by_id)}")
        return [by_id[i] for i in config.devices]
    if len(available) < config.tp_degree:
        raise ConfigError(
            f"tp_degree={config.tp_degree} needs {config.tp_degree} {config.backend} devices but only "
            f"{len(available)} exist. On CPU, load the model before any other jax work so nx can create "
            f"them, or start Python with JAX_NUM_CPU_DEVICES={config.tp_degree}"
        )
    return available[: config.tp_degree]


def _check_generate_options(method: Callable, kwargs: dict) -> None:
    """Name the options `generate` / `stream` do not take (HF users pass ``num_beams`` and the like)
    instead of failing with a bare TypeError."""
    unknown = sorted(set(kwargs) - _generate_options(method))
    if unknown:
        raise InputError(
            f"{method.__name__}() does not take {', '.join(unknown)}; its options are "
            f"{', '.join(sorted(_generate_options(method)))}. Beam search and transformers' other generation "
            "strategies run on nx through nx.hf.HuggingFaceGenerationModelAdapter"
        )


@functools.cache
def _generate_options(method: Callable) -> frozenset[str]:
    """The keyword options `method` takes itself or passes on to `NxModel._generate_steps`."""
    names = set(inspect.signature(method).parameters) | set(inspect.signature(NxModel._generate_steps).parameters)
    return frozenset(names - {"self", "input_ids", "attention_mask", "kwargs"})
