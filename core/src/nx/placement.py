"""Placement: which devices a model runs on, and how host arrays get there.

`Placement` owns the 1-D ``tp`` mesh; `place_params` turns a host parameter tree into device
arrays laid out for tensor parallelism (re-layout, optional quantization, scanned-layer stacking,
casting to the compute dtype), releasing each host array once it is placed so the host never
holds the model twice. On CPU devices the weights live in a `nx.memory.WeightArena` (huge pages).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from nx import memory, scan, sharding
from nx.config import RuntimeConfig
from nx.errors import ConfigError
from nx.ops.quant import is_quantized
from nx.quant import QuantizationConfig, panel_layout, quantize_params
from nx.spec import ModelSpec

AMP_DTYPES = {"f32": jnp.float32, "bf16": jnp.bfloat16, "f16": jnp.float16}


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


class Placement:
    """The mesh of one model and the ways values cross between host and devices."""

    def __init__(self, config: RuntimeConfig) -> None:
        self.config = config
        self.dtype = AMP_DTYPES[config.amp]
        self.kv_dtype = AMP_DTYPES[config.cache_dtype]
        self.mesh = Mesh(np.array(select_devices(config)), (sharding.AXIS,))
        self.device = self.mesh.devices.flat[0]
        self.devices = list(self.mesh.devices.flat)
        self.replicated = NamedSharding(self.mesh, P())

    @property
    def tp(self) -> int:
        return self.config.tp_degree

    def sharding(self, spec: P) -> NamedSharding:
        return NamedSharding(self.mesh, spec)

    @staticmethod
    def place(a: np.ndarray, where: NamedSharding, arena: memory.WeightArena | None = None) -> jax.Array:
        """Put a host array on the mesh; each process supplies only the shards it holds. With an
        `arena` (CPU devices), each shard is copied into it first and the devices read it in place."""
        return jax.make_array_from_callback(a.shape, where, lambda idx: a[idx] if arena is None else arena.copy(a[idx]))

    def put(self, a: Any) -> jax.Array:
        """A small host value, replicated over the mesh (program inputs)."""
        return self.place(np.asarray(a), self.replicated)

    @staticmethod
    def host(a: jax.Array) -> np.ndarray:
        """A replicated device value on the host (works across processes too)."""
        return np.asarray(a.addressable_data(0))

    def cast(self, a: Any) -> Any:
        """A host parameter in the compute dtype, owning its memory (quantized weights as they are).

        A view (of a dequantized GGUF buffer, a mapped file) would keep its base alive on the
        CPU backend next to the placed copy."""
        if is_quantized(a):
            return a
        out = a.astype(self.dtype, copy=False) if np.issubdtype(a.dtype, np.floating) else a
        return out if _owns_all(out) else out.copy()

    def place_params(self, params: dict, spec: ModelSpec, unroll: int | None,
                     quant: QuantizationConfig | None = None, prepared: bool = False) -> tuple[dict, dict]:
        """(device params, their partition specs) from a host tree, which is consumed.

        Unless `prepared` (restored from an artifact: already re-laid out and quantized), the
        tree is re-laid out for tensor parallelism and quantized after that, so scales shard with
        their columns (grouped weights the cpu kernels read then take their panel layout). With
        `unroll`, layers are stacked into scanned blocks (`nx.scan`)."""
        params = _take(params)
        if not prepared:
            params = sharding.relayout(params, spec, self.tp)
            if quant is not None:
                params = quantize_params(params, quant, self.config.amp, self.config.backend)
                params = panel_layout(params, self.tp)
        names = sharding.tree_names(params)
        specs = jax.tree.map(lambda n, a: sharding.partition_spec(n, a.ndim), names, params)
        if unroll:
            params["layers"] = scan.stack(params["layers"], unroll)
            specs["layers"] = scan.stack_specs(specs["layers"], unroll)
        leaves, tree = jax.tree.flatten(params, is_leaf=is_quantized)
        del params  # `leaves` is now the only holder of the host arrays
        arena = memory.WeightArena() if self.device.platform == "cpu" else None
        placed, freed = [], 0
        for i, where in enumerate(tree.flatten_up_to(specs)):
            a, leaves[i] = self.cast(leaves[i]), None  # peak host memory: one tensor, not the model
            placed.append(jax.tree.map(lambda x, ps: self.place(x, self.sharding(ps), arena), a, where))
            freed += sum(x.nbytes for x in jax.tree.leaves(a))
            del a
            if freed >= memory.TRIM_BYTES:  # the freed heap back to the OS now and then, not per tensor
                memory.return_freed_memory()
                freed = 0
        memory.return_freed_memory()
        return tree.unflatten(placed), specs


def _owns_all(a: np.ndarray) -> bool:
    """Whether `a` holds its memory alone: its own, or all of a plain array it reshapes. A view of
    part of a buffer, or of a mapped file, would keep that alive next to the placed copy."""
    base = a
    while isinstance(base, np.ndarray) and not base.flags.owndata:
        base = base.base
    return isinstance(base, np.ndarray) and type(base) is np.ndarray and base.nbytes == a.nbytes


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
