"""One compiled program as bytes and back: what saved artifacts and the compile cache store.

The bytes are `jax.experimental.serialize_executable`'s: XLA's serialized executable (machine
code for one jax/jaxlib version, platform and device setup) inside a small pickle of jax's
metadata (avals, shardings, layouts). `from_bytes` never unpickles it freely: a restricted
unpickler (`ALLOWED`, the jax / numpy classes jax's own serialized programs hold, found by
recording them) refuses any other global with `ArtifactError`, so a planted pickle cannot run
Python code on load. Rebuilding jax's callable without any pickle would mean constructing jax's
private executable classes from nx's own records, which break between jax versions; the
allowlist is what nx does instead. What the bytes still are is machine code: a program runs
when called, so the checks before it (versions, platform, checksums, and `signature` against
the manifest and the model, see `nx.artifacts`) are what stand between a swapped or foreign
program and the devices; they check integrity, not who wrote the files.

XLA:CPU cannot serialize a program it deserialized: the copy lacks some of the kernels and fails
when run ("Function bitcast_gather_fusion.2 not found"). So each loaded program is remembered with
the bytes it came from, and `to_bytes` returns those: a model restored from an artifact or the
compile cache saves as a working artifact.
"""

from __future__ import annotations

import io
import pickle
import threading
import weakref
from typing import Any

from nx.errors import ArtifactError
from nx.version import __version__
from nx.xla_options import cpu_flags

_SOURCE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # loaded program -> its bytes
_SOURCE_LOCK = threading.Lock()


def to_bytes(executable: Any) -> bytes:
    """The serialized form of a compiled program (`ArtifactError` if the backend cannot do it)."""
    from jax.experimental import serialize_executable

    with _SOURCE_LOCK:
        source = _SOURCE.get(executable)
    if source is not None:
        return source
    try:
        blob, _, _ = serialize_executable.serialize(executable)
    except (ValueError, NotImplementedError) as exc:
        raise ArtifactError(f"this backend cannot serialize compiled programs ({exc})") from exc
    return blob


def from_bytes(blob: bytes, in_tree: Any, out_tree: Any, devices: list) -> Any:
    """A program loaded from `to_bytes` output onto `devices`, taking and returning the pytrees
    `in_tree` / `out_tree` (`nx.programs.ProgramSet.trees`).

    XLA reports bad bytes with its own error types; callers turn those into `ArtifactError`.
    """
    import jax
    from jax._src.interpreters.pxla import UnloadedMeshExecutable
    from jax._src.stages import ArgInfo

    try:
        loaded = _unpickler(io.BytesIO(blob), devices).load()
    except pickle.UnpicklingError as exc:
        raise ArtifactError(f"not a serialized program ({exc})") from exc
    ok = (isinstance(loaded, tuple) and len(loaded) == 3 and isinstance(loaded[0], UnloadedMeshExecutable)
          and isinstance(loaded[1], list) and all(isinstance(a, ArgInfo) for a in loaded[1])
          and isinstance(loaded[2], bool))
    if not ok:
        raise ArtifactError("not a serialized jax program (unexpected contents)")
    unloaded, args_info_flat, no_kwargs = loaded
    if len(args_info_flat) != in_tree.num_leaves:
        raise ArtifactError(f"the program takes {len(args_info_flat)} inputs but this model passes {in_tree.num_leaves}")
    executable = jax.stages.Compiled(unloaded.load(), [], in_tree.unflatten(args_info_flat), out_tree,
                                     no_kwargs=no_kwargs)
    with _SOURCE_LOCK:
        _SOURCE[executable] = bytes(blob)
    return executable


#: The only globals a serialized program may name (module, name): the classes jax's own serialized
#: programs hold (recorded from nx's programs, 1 and 2 devices, f32/bf16/int8). Each is plain data
#: whose construction runs no code from the file; any other global is refused.
ALLOWED = frozenset({
    ("jax", "P"),
    ("jax.sharding", "PartitionSpec"),
    ("jax._src.partition_spec", "PartitionSpec"),
    ("jax._src.core", "ManualAxisType"),
    ("jax._src.core", "MemorySpace"),
    ("jax._src.core", "ShapedArray"),
    ("jax._src.interpreters.pxla", "AllArgsInfo"),
    ("jax._src.interpreters.pxla", "UnloadedMeshExecutable"),
    ("jax._src.layout", "Layout"),
    ("jax._src.linear_util", "DebugInfo"),
    ("jax._src.mesh", "AbstractDevice"),
    ("jax._src.mesh", "AbstractMesh"),
    ("jax._src.mesh", "AxisType"),
    ("jax._src.mesh", "Mesh"),
    ("jax._src.named_sharding", "_unpickle_named_sharding"),
    ("jax._src.stages", "ArgInfo"),
    ("jaxlib._jax", "DeviceList"),
    ("numpy", "dtype"),
    ("numpy", "ndarray"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "_reconstruct"),
    *(("ml_dtypes", t) for t in ("bfloat16", "float8_e4m3fn", "float8_e5m2", "int4", "uint4")),
})


def _unpickler(file: io.BytesIO, devices: list) -> pickle.Unpickler:
    """jax's unpickler for serialized programs (it turns the executable's persistent id into
    ``client.deserialize_executable`` of the raw XLA bytes), limited to the `ALLOWED` globals."""
    from jax.experimental.serialize_executable import _JaxPjrtUnpickler

    class Restricted(_JaxPjrtUnpickler):
        def find_class(self, module: str, name: str) -> Any:
            if (module, name) not in ALLOWED:
                raise ArtifactError(
                    f"the serialized program names {module}.{name}, which is not part of a jax program; it is "
                    "refused and not loaded (the file was not written by nx); recompile it (nx compile / model.save)"
                )
            return super().find_class(module, name)

        def persistent_load(self, pid: Any) -> Any:
            if not (isinstance(pid, tuple) and pid and pid[0] in ("exec", "device", "client")):
                raise pickle.UnpicklingError(f"unexpected persistent id {pid!r:.80}")
            return super().persistent_load(pid)

    return Restricted(file, devices[0].client, devices)


def signature(executable: Any) -> dict:
    """What a compiled program takes and returns, as the manifest records it: its XLA module name
    (nx names each program's function after its `ProgramKey`), each input's aval (``donated`` if
    so) and sharding, each output's shape, dtype and sharding. Equal for a program and its
    deserialized copy, so a load can tell a swapped or foreign program before running it."""
    import jax

    try:
        name = executable.runtime_executable().hlo_modules()[0].name
    except Exception:  # a backend that cannot list its modules: the shapes still count
        name = None
    args = jax.tree.leaves(executable.args_info)
    shardings = jax.tree.leaves(executable.input_shardings, is_leaf=lambda x: x is None)
    return {
        "program": name,
        "inputs": [f"{a._aval.str_short()}{' donated' if a.donated else ''}" for a in args],
        "input_shardings": [str(s) for s in shardings],
        "outputs": [f"{o.dtype}{list(o.shape)} {o.sharding}" for o in jax.tree.leaves(executable.out_info)],
    }


#: CPU features an XLA:CPU executable may have been compiled to use (it targets the host CPU).
CPU_FEATURES = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw",
                "avx512dq", "avx512vl", "avx512cd", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


def cpu_features() -> list[str]:
    """The instruction-set features of this CPU that compiled programs may depend on."""
    return sorted(cpu_flags() & set(CPU_FEATURES))


def environment(devices: list) -> dict:
    """What a serialized executable depends on: versions, platform, devices (and CPU features and
    the nx-kernels-cpu release its programs call, None when they call none)."""
    import jax
    import jaxlib

    from nx.ops import cpu_kernels

    dev = devices[0]
    env = {
        "nx_version": __version__,
        "jax_version": jax.__version__,
        "jaxlib_version": jaxlib.__version__,
        "platform": dev.platform,
        "platform_version": dev.client.platform_version,
        "device_kind": dev.device_kind,
        "device_count": len(devices),
        "process_device_count": len(jax.devices(dev.platform)),
    }
    if dev.platform == "cpu":
        env["cpu_features"] = cpu_features()
        env["cpu_kernels"] = cpu_kernels.package() if cpu_kernels.enabled() else None
    return env
