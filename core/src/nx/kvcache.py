"""`KVCache`: the on-device key/value cache of one model, and which batch rows are in use.

One ``(K, V)`` pair per layer (per layer of a scanned block, with a leading block axis), laid out
as `nx.ops.attention` reads it: rows ``kv_head * batch + b``, sharded over whole kv heads. Programs
take the arrays, donate them and hand back the updated ones (`swap`), so XLA writes in place.
Batch rows are handed to requests (`acquire` / `release`) so several requests can share one cache.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from nx import ops, sharding
from nx.errors import InputError, ResourceError
from nx.placement import Placement
from nx.spec import ModelSpec


class KVCache:
    """Every layer's K and V cache for `batch` rows of `positions` slots."""

    def __init__(self, spec: ModelSpec, placement: Placement, batch: int, positions: int, unroll: int | None) -> None:
        self.batch, self.positions, self.unroll = batch, positions, unroll
        self.placement = placement
        tp = placement.tp
        self.kv_heads = sharding.cache_kv_heads(spec, tp)
        shapes = ops.cache_shapes(batch, positions, self.kv_heads, spec.head_dim)
        self.pairs = spec.n_layers
        if unroll:  # one stacked pair per layer of a scanned block
            shapes, self.pairs = tuple((spec.n_layers // unroll, *shape) for shape in shapes), unroll
        self.shapes = shapes
        #: partition spec of every cache array: split over whole kv heads (after a scanned block's axis)
        self.spec = P(*([None] * (1 if unroll else 0)), sharding.AXIS, None, None)
        self.dtype = placement.kv_dtype  # the values' dtype
        self.stored_dtype = ops.cache_dtype(self.dtype)  # 16-bit floats as their uint16 bits
        #: held while a program reads and replaces the arrays (they are donated)
        self.lock = threading.RLock()
        self._free = list(range(batch))
        self._owners: dict[int, int] = {}  # row -> thread id holding it
        self._rows_changed = threading.Condition()
        self._gather: Callable | None = None
        self.arrays = self.allocate()

    def allocate(self) -> list[tuple[jax.Array, jax.Array]]:
        """New zeroed arrays of this cache's layout, dtype and sharding."""
        where = self.placement.sharding(self.spec)
        shapes, dtype = self.shapes, self.stored_dtype
        if self.placement.device.platform == "cpu":  # host zeros: no XLA program to compile at start-up
            return [tuple(self.placement.place(np.zeros(s, dtype), where) for s in shapes) for _ in range(self.pairs)]
        zeros = jax.jit(lambda: tuple(jnp.zeros(s, dtype) for s in shapes), out_shardings=(where, where))
        return [zeros() for _ in range(self.pairs)]

    def per_pair(self, leaf: Any) -> list[tuple[Any, Any]]:
        """`leaf` (a partition spec or sharding) for the K and V of every pair: a program's cache tree."""
        return [(leaf, leaf)] * self.pairs

    @property
    def specs(self) -> list[tuple[P, P]]:
        return self.per_pair(self.spec)

    @property
    def shardings(self) -> list[tuple[Any, Any]]:
        return self.per_pair(self.placement.sharding(self.spec))

    def swap(self, arrays: list[tuple[jax.Array, jax.Array]]) -> None:
        """Take the arrays a program returned (the old ones were donated to it)."""
        self.arrays = arrays

    def nbytes(self) -> int:
        return sum(a.nbytes for pair in self.arrays for a in pair)

    # ---- rows ----------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return len(self._free)

    def acquire(self, n: int = 1, wait: bool = False) -> list[int]:
        """Hand `n` free batch rows (lowest first) to the calling thread.

        Too few free rows is a `ResourceError`, or with `wait` a wait for other threads to release
        theirs; a thread that already holds rows and would wait on itself gets an `InputError`
        (two generations interleaved in one thread would overwrite each other's cache rows)."""
        me = threading.get_ident()
        with self._rows_changed:
            while n > len(self._free):
                if not wait:
                    raise ResourceError(f"{n} cache rows wanted but {len(self._free)} of {self.batch} are free")
                if me in self._owners.values():
                    raise InputError(
                        "another generation on this model is still open in this thread (an unfinished stream()?); "
                        "finish or close it first, or run concurrent requests through nx.Engine"
                    )
                self._rows_changed.wait()
            rows, self._free = self._free[:n], self._free[n:]
            self._owners.update(dict.fromkeys(rows, me))
            return rows

    def release(self, rows: list[int]) -> None:
        """Give rows back; their contents are stale and overwritten before they are read again."""
        with self._rows_changed:
            for r in rows:
                self._owners.pop(r, None)
            self._free = sorted(set(self._free) | set(rows))
            self._rows_changed.notify_all()

    # ---- reorder -------------------------------------------------------------------------------
    def reorder(self, rows: np.ndarray) -> None:
        """Make batch row i hold what row ``rows[i]`` held (beam search keeps some rows, duplicates
        others): one gather on the devices instead of encoding the sequences again."""
        if self._gather is None:
            self._gather = self._gather_program()
        with self.lock:
            self.arrays = self._gather(self.arrays, self.placement.put(np.asarray(rows, np.int32)))

    def _gather_program(self) -> Callable:
        batch_axis = 1 if self.unroll else 0

        def gather(caches, rows):
            def one(c):
                lead = c.shape[:batch_axis]
                grouped = c.reshape(*lead, -1, rows.shape[0], *c.shape[batch_axis + 1 :])
                return jnp.take(grouped, rows, axis=batch_axis + 1).reshape(c.shape)

            return jax.tree.map(one, caches)

        if self.placement.tp > 1:  # each device gathers its own heads
            gather = jax.shard_map(gather, mesh=self.placement.mesh, in_specs=(self.specs, P()), out_specs=self.specs)
        return jax.jit(gather, donate_argnums=(0,), out_shardings=self.shardings)
