"""The program set: every compiled program of one model, keyed by `ProgramKey`.

A program is `nx.decoder.step` plus token choice (`nx.sampling.choose`) over fixed shapes. It takes
``(params, caches, StepInputs, SamplingInputs)`` and returns ``(tokens, logits, caches, seen)``,
donating the caches so XLA updates them in place; only token ids need to cross to the host.
A multi-step decode program (``key.steps > 1``) also takes `BlockInputs` and loops over up to
``key.steps`` decode steps on the device, feeding each chosen token back (one host round trip per
block instead of per token); it returns ``(tokens [B, steps], logits, caches, seen, last, done)``.
`ProgramSet` lowers, compiles (through the compile cache when one is set, dumping HLO when asked),
loads saved ones on first use (`offer`), warms up and drops them, and runs one on the model's KV
cache. Each is an `nx.executables.Program`, checked against what this set passes it (`check`).
"""

from __future__ import annotations

import atexit
import contextlib
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor, as_completed
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec as P

from nx import decoder, dump, executables, memory, sharding, xla_options
from nx.buckets import ProgramKey
from nx.compile_cache import CompileCache
from nx.errors import ArtifactError
from nx.kvcache import KVCache
from nx.placement import Placement
from nx.progress import plural, track
from nx.sampling import SamplingInputs, choose
from nx.spec import ModelSpec


class BlockInputs(NamedTuple):
    """Traced inputs of a multi-step decode call (besides `StepInputs` and `SamplingInputs`, whose
    ``suppress`` is then each row's EOS mask)."""

    steps: jnp.ndarray  # [] int32: decode steps to run, <= key.steps (a window or max_new_tokens ends early)
    ban: jnp.ndarray  # [] int32: the first `ban` steps may not choose EOS (min_new_tokens)
    done: jnp.ndarray  # [B] bool: rows that met EOS before this call; the loop ends once every row has


class ProgramSet:
    """Compiled programs of one model over its params and KV cache. The params are fixed once
    given: every call passes the same arrays."""

    def __init__(self, spec: ModelSpec, placement: Placement, params: dict, param_specs: dict, kv: KVCache,
                 unroll: int | None) -> None:
        self.spec, self.placement, self.params, self.param_specs, self.kv, self.unroll = (
            spec, placement, params, param_specs, kv, unroll)
        # flattened once: a model's params are hundreds of leaves, quantized weights flattened in
        # Python, ~80 us a call on the 2-core CPU (BENCHMARKS.md, "Host work per step")
        self._param_leaves = jax.tree.leaves(params)
        self.local_spec = sharding.local_spec(spec, placement.tp)
        self._executables: dict[ProgramKey, executables.Program] = {}
        self._building: dict[ProgramKey, Future] = {}  # programs being built, so each is built once
        self._offered: dict[ProgramKey, tuple[Callable[[], bytes], str]] = {}  # saved programs, loaded on first use
        self._build_lock = threading.Lock()
        self._warmed: set[ProgramKey] = set()
        #: how many programs were loaded from offered (saved) bytes rather than compiled
        self.loaded = 0
        #: where compiled programs are looked up and stored (None compiles each)
        self.compile_cache: CompileCache | None = None
        #: directory receiving each program's HLO (text and HloModuleProto) when it compiles
        self.dump_to: str | None = None
        #: called with the key of each program about to be compiled (a loaded artifact sets it:
        #: it should hold every program, so one it lacks is reported)
        self.on_missing: Callable[[ProgramKey], None] | None = None

    # ---- what exists ---------------------------------------------------------------------------
    @property
    def keys(self) -> list[ProgramKey]:
        """Keys of the programs compiled (or loaded) so far, in the order they were built."""
        return list(self._executables)

    @property
    def warmed(self) -> set[ProgramKey]:
        return set(self._warmed)

    @property
    def offered(self) -> list[ProgramKey]:
        """Keys of saved programs that load on first use (`offer`) and are not loaded yet."""
        return [k for k in self._offered if k not in self._executables]

    def items(self) -> list[tuple[ProgramKey, executables.Program]]:
        return list(self._executables.items())

    def offer(self, key: ProgramKey, read: Callable[[], bytes], where: str) -> None:
        """Make saved program `key` available: `read()` gives its bytes (`Program.to_bytes`), which
        are loaded and checked when the program is first needed (an artifact starts without
        deserializing programs a request may never run); `where` names them in errors."""
        self._offered[ProgramKey(*key)] = (read, where)

    def drop(self) -> None:
        """Forget every program (each is built again, when needed, from offered bytes or the
        compile cache if set)."""
        with self.kv.lock:
            self._executables.clear()
            self._warmed.clear()

    # ---- building ------------------------------------------------------------------------------
    def _function(self, key: ProgramKey):
        spec, local, tp, kv = self.spec, self.local_spec, self.placement.tp, self.kv
        unroll = self.unroll

        def forward(params, caches, inp):
            axis = sharding.AXIS if tp > 1 else None
            return decoder.step(local, params, caches, inp, key.window, axis, spec.vocab_size, unroll, key.insert,
                                kv.dtype)

        if tp > 1:
            forward = jax.shard_map(
                forward, mesh=self.placement.mesh, in_specs=(self.param_specs, kv.specs, P()),
                out_specs=(P(), kv.specs),
                check_vma=False,  # logits are all-gathered, hence identical on every shard
            )
        # f32 means f32: GPUs would otherwise run f32 matmuls in TF32 and drift from the reference.
        precision = "highest" if self.placement.config.amp == "f32" else "default"

        def run(params, caches, inp: decoder.StepInputs, smp: SamplingInputs):
            with jax.default_matmul_precision(precision):
                logits, caches = forward(params, caches, inp)
            position = inp.slot + inp.last  # where each row's chosen token comes from (seeds the draw)
            if not key.insert:
                tokens, seen = choose(logits, smp, key.sample, jnp.repeat(position, logits.shape[0] // key.rows))
                return tokens, logits, caches, seen
            # one prompt into batch row `inp.row`: its sampling state only, `seen` restarted by the prompt
            mine = jax.tree.map(lambda a: lax.dynamic_slice_in_dim(a, inp.row, 1, axis=0), smp)
            valid = jnp.arange(key.tokens) <= inp.last  # the final chunk's padding is not the prompt's
            prompt = jnp.zeros(smp.seen.shape[1], bool).at[jnp.where(valid, inp.tokens[0], smp.seen.shape[1])].set(True, mode="drop")
            mine = mine._replace(seen=(jnp.where(inp.slot[0] == 0, False, mine.seen[0]) | prompt)[None])
            tokens, seen_row = choose(logits, mine, key.sample, position)
            return tokens, logits, caches, lax.dynamic_update_slice_in_dim(smp.seen, seen_row, inp.row, axis=0)

        def block(params, caches, inp: decoder.StepInputs, smp: SamplingInputs, blk: BlockInputs):
            # Up to key.steps decode steps, each as the one-step program runs it (same window, slot
            # and PRNG position, so the same tokens); ends early once every row has met EOS.
            rows, eos = key.rows, smp.suppress

            def one(carry):
                i, tok, caches, seen, done, out, _ = carry
                at = inp._replace(tokens=tok[:, None], slot=inp.slot + i)
                logits, caches = forward(params, caches, at)
                mine = smp._replace(seen=seen, suppress=eos & (i < blk.ban))
                tok, seen = choose(logits, mine, key.sample, at.slot + at.last)
                done = done | eos[jnp.arange(rows), tok]
                out = lax.dynamic_update_slice_in_dim(out, tok[:, None], i, axis=1)
                return i + 1, tok, caches, seen, done, out, logits

            def going(carry):
                return (carry[0] < blk.steps) & ~jnp.all(carry[4])

            logits = jax.eval_shape(forward, params, caches, inp)[0]
            with jax.default_matmul_precision(precision):
                _, last, caches, seen, done, out, logits = lax.while_loop(going, one, (
                    jnp.int32(0), inp.tokens[:, 0], caches, smp.seen, blk.done,
                    jnp.zeros((rows, key.steps), jnp.int32), jnp.zeros(logits.shape, logits.dtype)))
            return out, logits, caches, seen, last, done

        fn = block if key.steps > 1 else run
        # Named after its key: the name is in the compiled module, so a loaded program proves which it is.
        fn.__name__ = fn.__qualname__ = program_name(key)
        # Pinned output shardings: caches come back as they went in, so a program lowered after a
        # run is the same program (and the same compile-cache key).
        rep = self.placement.replicated
        outs = (rep, rep, kv.shardings, rep) + ((rep, rep) if key.steps > 1 else ())
        # Every input kept (unused sampling inputs too), so each program takes the same flat buffers.
        return jax.jit(fn, donate_argnums=(1,), out_shardings=outs, keep_unused=True)

    def abstract_inputs(self, key: ProgramKey) -> tuple:
        """Shapes, dtypes and placement of a program's step and sampling inputs (and `BlockInputs`
        of a multi-step decode program)."""
        b, v, rep = self.kv.batch, self.spec.vocab_size, self.placement.replicated

        def sds(shape, dtype):
            return jax.ShapeDtypeStruct(shape, dtype, sharding=rep)

        i32, f32 = jnp.int32, jnp.float32
        rows = key.rows
        inp = decoder.StepInputs(sds((rows, key.tokens), i32), sds((rows,), i32), sds((rows,), i32), sds((), i32),
                                 sds((), i32))
        rng = jax.eval_shape(lambda: jax.random.key_data(jax.random.key(0)))  # shape only: nothing compiles
        smp = SamplingInputs(sds((b,), f32), sds((b,), i32), sds((b,), f32), sds((b,), f32), sds((b, v), jnp.bool_),
                             sds((b, v), jnp.bool_), sds((b, *rng.shape), rng.dtype))
        if key.steps > 1:
            return inp, smp, BlockInputs(sds((), i32), sds((), i32), sds((rows,), jnp.bool_))
        return inp, smp

    def input_leaves(self, key: ProgramKey) -> list[jax.ShapeDtypeStruct]:
        """Shape, dtype and placement of every flat input of program `key` (the caches as the KV
        cache lays them out, whatever arrays it holds now)."""
        caches = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=where)
                  for a, where in zip(jax.tree.leaves(self.kv.arrays), jax.tree.leaves(self.kv.shardings))]
        params = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding) for a in self._param_leaves]
        return params + caches + jax.tree.leaves(self.abstract_inputs(key))

    def outputs(self, key: ProgramKey) -> tuple[Any, list]:
        """(tree, flat shardings) of program `key`'s outputs ``(tokens, logits, caches, seen)``,
        plus ``(last, done)`` for a multi-step decode program."""
        rep = self.placement.replicated
        more = (0, 0) if ProgramKey(*key).steps > 1 else ()
        tree = jax.tree.structure((0, 0, [(0, 0)] * self.kv.pairs, 0, *more))
        return tree, [rep, rep, *jax.tree.leaves(self.kv.shardings), rep, *[rep] * len(more)]

    def expected(self, key: ProgramKey) -> dict:
        """The signature (`nx.executables.hlo_signature`) program `key` of this set has: its
        module's name, what this set passes it (per-device shapes), the caches donated and
        returned as they went in. Computed from shapes alone: nothing is traced or lowered."""
        leaves = self.input_leaves(key)
        shapes = [executables.hlo_shape(a.sharding.shard_shape(a.shape), a.dtype) for a in leaves]
        n_params, n_caches = len(self._param_leaves), len(jax.tree.leaves(self.kv.arrays))
        return {"program": f"jit_{program_name(key)}", "inputs": shapes,
                "donated": list(range(n_params, n_params + n_caches)),
                "caches": shapes[n_params : n_params + n_caches]}

    def deserialize(self, blob: bytes, key: ProgramKey) -> executables.Program:
        """Program `key` of this set from `Program.to_bytes` output: its header is checked against
        what this set runs as `key` before XLA sees the bytes, and the executable after."""
        key = ProgramKey(*key)
        self.check(key, executables.read_header(blob))
        program = executables.from_bytes(blob, self.placement.devices, *self.outputs(key))
        self.check(key, program.signature)
        return program

    def check(self, key: ProgramKey, signature: dict) -> None:
        """`ArtifactError` unless `signature` is program `key`'s of this set: named after the key,
        taking the params, caches and inputs this set passes (shapes, dtypes, the caches donated)
        and returning the caches as they went in. A program is machine code run on these buffers:
        one built for other shapes must never be called."""
        want = self.expected(ProgramKey(*key))
        problems = []
        if signature.get("program") != want["program"]:
            problems.append(f"it is {signature.get('program')!r}")
        got = list(signature.get("inputs", []))
        if got != want["inputs"]:
            problems.append(f"it takes {len(got)} inputs that differ from this model's {len(want['inputs'])}: "
                            f"{_first_difference(got, want['inputs'])}")
        if list(signature.get("donated", [])) != want["donated"]:
            problems.append("it does not update the KV cache in place as this model's programs do")
        caches = list(signature.get("outputs", []))[2 : 2 + len(want["caches"])]
        if caches != want["caches"]:
            problems.append(f"it returns caches {_first_difference(caches, want['caches'])} (this model keeps "
                            f"{want['caches'][:1]})")
        if problems:
            raise ArtifactError(f"the compiled program {key.name} is not this model's {key.name}: {'; '.join(problems)}; "
                                "recompile it (nx compile / model.save)")

    def cache_key(self, key: ProgramKey, options: dict) -> dict:
        """What determines program `key` besides nx's code, jax and the machine (`nx.compile_cache`
        adds those): the model's spec, the shapes, dtypes and placement of every input, the
        compiler options. Computed without lowering, so a cached program loads without tracing."""
        leaves = self.input_leaves(key)
        return {
            "program": program_name(key),
            "spec": repr(self.spec),
            "amp": self.placement.config.amp,
            "kv_dtype": self.placement.config.cache_dtype,  # (f16 and bf16 caches are both uint16 arrays)
            "unroll": self.unroll,
            "tp": self.placement.tp,
            "inputs": [f"{jax.typeof(a).str_short()} {a.sharding}" for a in leaves],
            "params": str(jax.tree.structure(self.params)),
            "options": options,
        }

    def lower(self, key: ProgramKey):
        """The lowered (not yet compiled) program."""
        key = ProgramKey(*key)
        return self._function(key).lower(self.params, self.kv.arrays, *self.abstract_inputs(key))

    def get(self, key: ProgramKey) -> executables.Program:
        """The program of `key`: built on first use, once however many threads ask, from offered
        bytes (`offer`), the compile cache, or XLA."""
        key = ProgramKey(*key)
        program = self._executables.get(key)
        if program is not None:
            return program
        with self._build_lock:
            fut = self._building.get(key)
            mine = fut is None
            if mine:
                fut = self._building[key] = Future()
        if mine:
            try:
                program = self._build(key)
                self._executables[key] = program
                fut.set_result(program)
            except BaseException as exc:
                fut.set_exception(exc)
                raise
            finally:
                with self._build_lock:
                    self._building.pop(key, None)
        return fut.result()

    def _build(self, key: ProgramKey) -> executables.Program:
        offered = self._offered.get(key)
        if offered is not None:
            read, where = offered
            try:
                program = self.deserialize(read(), key)
            except Exception as exc:  # XLA reports bad bytes with its own error types
                raise ArtifactError(f"cannot load the compiled program {where}: {exc}; recompile the artifact "
                                    "(nx compile / model.save)") from exc
            with self._build_lock:
                self.loaded += 1
            return program
        if self.on_missing is not None:
            self.on_missing(key)
        options = xla_options.compiler_options(self.placement.device.platform, loop=key.steps > 1)

        def compile() -> executables.Program:
            lowered = self.lower(key)
            if self.dump_to:
                dump.dump_lowered(lowered, self.dump_to, key.name, options)
            return executables.from_compiled(lowered.compile(options), *self.outputs(key))

        cache = self.compile_cache
        if cache is None or self.dump_to:
            return compile()
        return cache.program(self.cache_key(key, options), self.placement.devices, compile,
                             lambda blob: self.deserialize(blob, key))

    def compile(self, keys: Iterable[ProgramKey], progress: bool | None = None, *, workers: int | None = None,
                warm: bool = False) -> None:
        """Build every program of `keys`, `workers` at a time (XLA compiles outside the GIL), and with
        `warm` run each once as soon as it is built, so first requests skip XLA's first-call setup."""
        wanted = dict.fromkeys(ProgramKey(*k) for k in keys)
        todo = [k for k in wanted if k not in self._executables or (warm and k not in self._warmed)]
        if not todo:
            return

        def build(key: ProgramKey) -> None:
            self.get(key)
            if warm:
                self.warm(key)

        verb = "loading" if all(k in self._offered for k in todo) else "compiling"
        what = f"{verb} {'and warming up ' if warm else ''}{plural(len(todo), 'program')}"
        with ThreadPoolExecutor(max_workers=max(1, workers or xla_options.default_workers())) as pool:
            done = as_completed([pool.submit(build, key) for key in todo])
            for fut in track(done, what, total=len(todo), enabled=progress):
                fut.result()
        memory.return_freed_memory()

    def prefetch(self, keys: Iterable[ProgramKey], warm: bool = False) -> threading.Thread:
        """Build `keys` on a background thread (saved programs load while the caller goes on), and
        with `warm` run each once (`warm`: join the thread before any request runs, as warm-up
        writes placeholder keys and values into the cache). A program that fails to build raises
        when it is asked for (`get` builds it again). At exit the thread stops after the program in
        hand: XLA must not be torn down under it."""
        stop = threading.Event()

        def run() -> None:
            try:
                for key in keys:
                    if stop.is_set():
                        return
                    with contextlib.suppress(Exception):
                        self.get(key)
                        if warm:
                            self.warm(key)
            finally:
                _PREFETCHING.pop(thread, None)

        thread = threading.Thread(target=run, name="nx-programs", daemon=True)
        _PREFETCHING[thread] = stop
        thread.start()
        return thread

    def warm(self, key: ProgramKey) -> None:
        """Run one program once on placeholder inputs. The keys and values it leaves in the cache
        are never read: a request writes every slot it attends to before attending."""
        key = ProgramKey(*key)
        put = self.placement.put
        zeros = jax.tree.map(lambda s: put(np.zeros(s.shape, s.dtype)), self.abstract_inputs(key))
        inp = zeros[0]._replace(last=put(np.int32(key.tokens - 1)))
        blk = zeros[2]._replace(steps=put(np.int32(1))) if key.steps > 1 else None  # one step: slot 0 only
        tokens = self.run(key, inp, zeros[1], blk)[0]
        jax.block_until_ready(tokens)
        self._warmed.add(key)

    def run(self, key: ProgramKey, inp: decoder.StepInputs, smp: SamplingInputs,
            blk: BlockInputs | None = None) -> tuple[jax.Array, ...]:
        """Run one program on the KV cache; returns (tokens, logits, seen), and (..., last, done)
        for a multi-step decode program (which takes `blk`)."""
        exe = self.get(key)
        args = (inp, smp) if blk is None else (inp, smp, blk)
        with self.kv.lock:  # the caches are donated and replaced
            out = exe.call_flat([*self._param_leaves, *jax.tree.leaves((self.kv.arrays, *args))])
            self.kv.swap(out[2])
        return (*out[:2], *out[3:])


_PREFETCHING: dict[threading.Thread, threading.Event] = {}  # background builds running, and their stop signals


@atexit.register
def _stop_prefetching() -> None:
    """Let background builds finish the program in hand before the interpreter goes."""
    running = list(_PREFETCHING.items())
    for _, stop in running:
        stop.set()
    for thread, _ in running:
        thread.join()


def program_name(key: ProgramKey) -> str:
    """The name of program `key`'s function, hence of its XLA module (``jit_<name>``)."""
    return f"nx_{ProgramKey(*key).name}"


def _first_difference(got: list[str], want: list[str]) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"input {i} is {g}, expected {w}"
    return f"{len(got)} inputs, expected {len(want)}"
