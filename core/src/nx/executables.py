"""One compiled program as bytes and back: what saved artifacts and the compile cache store.

The bytes are `jax.experimental.serialize_executable`'s: XLA's serialized executable (machine
code for one jax/jaxlib version, platform and device setup) wrapped in a small pickle. Loading
them prepares that code to run, so only load programs you built or trust (`nx.artifacts` and
`nx.compile_cache` check versions, platform and checksums first).

XLA:CPU cannot serialize a program it deserialized: the copy lacks some of the kernels and fails
when run ("Function bitcast_gather_fusion.2 not found"). So each loaded program is remembered with
the bytes it came from, and `to_bytes` returns those: a model restored from an artifact or the
compile cache saves as a working artifact.
"""

from __future__ import annotations

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
    from jax.experimental import serialize_executable

    executable = serialize_executable.deserialize_and_load(
        blob, in_tree, out_tree, backend=devices[0].client, execution_devices=devices
    )
    with _SOURCE_LOCK:
        _SOURCE[executable] = bytes(blob)
    return executable


#: CPU features an XLA:CPU executable may have been compiled to use (it targets the host CPU).
CPU_FEATURES = ("sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "bmi1", "bmi2", "avx512f", "avx512bw",
                "avx512dq", "avx512vl", "avx512cd", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni",
                "amx_tile", "amx_bf16", "amx_int8", "neon", "asimd", "sve")


def cpu_features() -> list[str]:
    """The instruction-set features of this CPU that compiled programs may depend on."""
    return sorted(cpu_flags() & set(CPU_FEATURES))


def environment(devices: list) -> dict:
    """What a serialized executable depends on: versions, platform, devices (and CPU features)."""
    import jax
    import jaxlib

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
    return env
