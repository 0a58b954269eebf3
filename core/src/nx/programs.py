"""The program set: every compiled program of one model, keyed by `ProgramKey`.

A program is `nx.decoder.step` plus token choice (`nx.sampling.choose`) over fixed shapes. It takes
``(params, caches, StepInputs, SamplingInputs)`` and returns ``(tokens, logits, caches, seen)``,
donating the caches so XLA updates them in place; only token ids need to cross to the host.
`ProgramSet` lowers, compiles (through the compile cache when one is set, dumping HLO when asked),
warms up and drops them, and runs one on the model's KV cache.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor, as_completed
from typing import Any

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


class ProgramSet:
    """Compiled programs of one model over its params and KV cache."""

    def __init__(self, spec: ModelSpec, placement: Placement, params: dict, param_specs: dict, kv: KVCache,
                 unroll: int | None) -> None:
        self.spec, self.placement, self.params, self.param_specs, self.kv, self.unroll = (
            spec, placement, params, param_specs, kv, unroll)
        self.local_spec = sharding.local_spec(spec, placement.tp)
        self._executables: dict[ProgramKey, Any] = {}
        self._warmed: set[ProgramKey] = set()
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

    def items(self) -> list[tuple[ProgramKey, Any]]:
        return list(self._executables.items())

    def add(self, key: ProgramKey, executable: Any) -> None:
        """Adopt a program built elsewhere (deserialized from an artifact)."""
        self._executables[ProgramKey(*key)] = executable

    def drop(self) -> None:
        """Forget every program (each is built again, from the compile cache if set, when needed)."""
        with self.kv.lock:
            self._executables.clear()
            self._warmed.clear()

    # ---- building ------------------------------------------------------------------------------
    def _function(self, key: ProgramKey):
        spec, local, tp, kv = self.spec, self.local_spec, self.placement.tp, self.kv
        unroll = self.unroll

        def forward(params, caches, inp):
            axis = sharding.AXIS if tp > 1 else None
            return decoder.step(local, params, caches, inp, key.window, axis, spec.vocab_size, unroll, key.insert)

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

        # Named after its key: the name is in the compiled module, so a loaded program proves which it is.
        run.__name__ = run.__qualname__ = program_name(key)
        # Pinned output shardings: caches come back as they went in, so a program lowered after a
        # run is the same program (and the same compile-cache key).
        rep = self.placement.replicated
        return jax.jit(run, donate_argnums=(1,), out_shardings=(rep, rep, kv.shardings, rep))

    def abstract_inputs(self, key: ProgramKey) -> tuple[decoder.StepInputs, SamplingInputs]:
        """Shapes, dtypes and placement of a program's step and sampling inputs."""
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
        return inp, smp

    def trees(self) -> tuple[Any, Any]:
        """(input tree, output tree) every program of this set has (what deserializing needs)."""
        in_tree = jax.tree.structure(((self.params, self.kv.arrays, decoder.StepInputs(*[0] * 5),
                                       SamplingInputs(*[0] * len(SamplingInputs._fields))), {}))
        out_tree = jax.tree.structure((0, 0, [(0, 0)] * self.kv.pairs, 0))
        return in_tree, out_tree

    def deserialize(self, blob: bytes, key: ProgramKey) -> Any:
        """Program `key` of this set from `executables.to_bytes` output, checked against what this set
        runs as `key` (`check`) before anything calls it (XLA reports bad bytes its own way)."""
        exe = executables.from_bytes(blob, *self.trees(), self.placement.devices)
        self.check(ProgramKey(*key), exe)
        return exe

    def check(self, key: ProgramKey, exe: Any) -> None:
        """`ArtifactError` unless `exe` is program `key` of this set: its compiled module carries the
        key's name, it takes the params, caches and inputs this set passes (shapes, dtypes, the caches
        donated) and returns caches placed like this set's. A program is machine code run on these
        buffers: one built for other shapes must never be called."""
        sig = executables.signature(exe)
        problems = []
        if sig["program"] is not None and sig["program"] != f"jit_{program_name(key)}":
            problems.append(f"it is {sig['program']!r}")
        leaves = jax.tree.leaves((self.params, self.kv.arrays, *self.abstract_inputs(key)))
        n_params, n_caches = len(jax.tree.leaves(self.params)), len(jax.tree.leaves(self.kv.arrays))
        want = [f"{jax.typeof(a).str_short()}{' donated' if n_params <= i < n_params + n_caches else ''}"
                for i, a in enumerate(leaves)]
        if sig["inputs"] != want:
            problems.append(f"it takes {len(sig['inputs'])} inputs that differ from this model's {len(want)}: "
                            f"{_first_difference(sig['inputs'], want)}")
        caches = jax.tree.leaves(exe.out_info)[2 : 2 + n_caches]
        for got, a in zip(caches, jax.tree.leaves(self.kv.arrays)):
            if (got.shape, got.dtype) != (a.shape, a.dtype) or not got.sharding.is_equivalent_to(a.sharding, a.ndim):
                problems.append(f"it returns a cache {got.dtype}{list(got.shape)} {got.sharding} where this model "
                                f"keeps {a.dtype}{list(a.shape)} {a.sharding}")
                break
        if problems:
            raise ArtifactError(f"the compiled program {key.name} is not this model's {key.name}: {'; '.join(problems)}; "
                                "recompile it (nx compile / model.save)")

    def lower(self, key: ProgramKey):
        """The lowered (not yet compiled) program."""
        key = ProgramKey(*key)
        return self._function(key).lower(self.params, self.kv.arrays, *self.abstract_inputs(key))

    def get(self, key: ProgramKey) -> Any:
        """The compiled program of `key`, compiling (or loading from the compile cache) on first use."""
        key = ProgramKey(*key)
        if key not in self._executables:
            if self.on_missing is not None:
                self.on_missing(key)
            lowered = self.lower(key)
            options = xla_options.compiler_options(self.placement.device.platform)
            if self.dump_to:
                dump.dump_lowered(lowered, self.dump_to, key.name, options)
            cache = self.compile_cache
            self._executables[key] = (lowered.compile(options) if cache is None else cache.compile(
                lowered, options, self.placement.devices, functools.partial(self.deserialize, key=key)))
        return self._executables[key]

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

        what = ("compiling and warming up " if warm else "compiling ") + plural(len(todo), "program")
        with ThreadPoolExecutor(max_workers=max(1, workers or xla_options.default_workers())) as pool:
            done = as_completed([pool.submit(build, key) for key in todo])
            for fut in track(done, what, total=len(todo), enabled=progress):
                fut.result()
        memory.return_freed_memory()

    def warm(self, key: ProgramKey) -> None:
        """Run one program once on placeholder inputs. The keys and values it leaves in the cache
        are never read: a request writes every slot it attends to before attending."""
        key = ProgramKey(*key)
        inp, smp = self.abstract_inputs(key)
        put = self.placement.put
        zeros = jax.tree.map(lambda s: put(np.zeros(s.shape, s.dtype)), (inp, smp))
        inp = zeros[0]._replace(last=put(np.int32(key.tokens - 1)))
        tokens, _, _ = self.run(key, inp, zeros[1])
        jax.block_until_ready(tokens)
        self._warmed.add(key)

    def run(self, key: ProgramKey, inp: decoder.StepInputs, smp: SamplingInputs) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Run one program on the KV cache; returns (tokens, logits, seen)."""
        exe = self.get(key)
        with self.kv.lock:  # the caches are donated and replaced
            tokens, logits, caches, seen = exe(self.params, self.kv.arrays, inp, smp)
            self.kv.swap(caches)
        return tokens, logits, seen


def program_name(key: ProgramKey) -> str:
    """The name of program `key`'s function, hence of its XLA module (``jit_<name>``)."""
    return f"nx_{ProgramKey(*key).name}"


def _first_difference(got: list[str], want: list[str]) -> str:
    for i, (g, w) in enumerate(zip(got, want)):
        if g != w:
            return f"input {i} is {g}, expected {w}"
    return f"{len(got)} inputs, expected {len(want)}"
