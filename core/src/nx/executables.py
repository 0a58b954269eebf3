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


def from_bytes(blob: bytes, model: Any) -> Any:
    """A program of `model` (any of its buckets) loaded from `to_bytes` output onto its devices.

    XLA reports bad bytes with its own error types; callers turn those into `ArtifactError`.
    """
    import jax
    from jax.experimental import serialize_executable

    from nx.decoder import StepInputs
    from nx.sampling import SamplingInputs

    devices = list(model.mesh.devices.flat)
    out_tree = jax.tree.structure((0, 0, [(0, 0)] * len(model.caches), 0))
    in_tree = jax.tree.structure(
        ((model.params, model.caches, StepInputs(*[0] * 4), SamplingInputs(*[0] * len(SamplingInputs._fields))), {})
    )
    executable = serialize_executable.deserialize_and_load(
        blob, in_tree, out_tree, backend=devices[0].client, execution_devices=devices
    )
    with _SOURCE_LOCK:
        _SOURCE[executable] = bytes(blob)
    return executable
