"""One compiled program, called on flat device buffers, and its pickle-free file format.

A `Program` is an XLA executable (``jaxlib`` ``LoadedExecutable``) plus how its flat outputs
become jax arrays again. It is called with the same pytree of arrays every time (nx's programs
keep every input: ``keep_unused``), which it flattens and hands to ``execute_sharded``: the
path jax's own dispatcher takes, with less per-call work for nx's ~250 inputs.

`to_bytes` writes ``MAGIC``, a JSON header (the program's `signature`) and XLA's own serialized
executable, as jax's persistent compilation cache stores it: no pickle anywhere, so reading a
file can run no Python code from it. `from_bytes` parses the header as JSON, lets the caller
compare it with what the program must be (`nx.programs.ProgramSet.check`), deserializes the
XLA bytes, and reads the signature again from the executable itself (its HLO module's name,
parameter and result shapes, donated inputs): a header that lies about its program is caught
before anything runs. What the bytes still are is machine code: it runs when called, so these
checks and the checksums around them (`nx.artifacts`, `nx.compile_cache`) stand between a
swapped or foreign program and the devices; they check integrity, not who wrote the files.

XLA:CPU cannot serialize a program it deserialized (the copy lacks some kernels and fails when
run), so a loaded program keeps the bytes it came from, and `to_bytes` returns those.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Sequence
from typing import Any

from nx.errors import ArtifactError
from nx.version import __version__
from nx.xla_options import cpu_flags

MAGIC = b"nx-program 2\n"
_LENGTH = struct.Struct("<Q")
_MAX_HEADER = 1 << 24  # a real header is a few KB; a bigger length is a damaged file

#: numpy / ml_dtypes dtype names as HLO writes them
_HLO_TYPES = {"bool": "pred", "int8": "s8", "int16": "s16", "int32": "s32", "int64": "s64", "uint8": "u8",
              "uint16": "u16", "uint32": "u32", "uint64": "u64", "float16": "f16", "bfloat16": "bf16",
              "float32": "f32", "float64": "f64", "int4": "s4", "uint4": "u4"}
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_ALIAS = re.compile(r"\((\d+), \{[0-9, ]*\}, (?:may|must)-alias\)")


def hlo_shape(shape: Sequence[int], dtype: Any) -> str:
    """A buffer's shape as HLO prints it: ``f32[2,64]``, ``s32[]``."""
    return f"{_HLO_TYPES.get(str(dtype), str(dtype))}[{','.join(str(int(d)) for d in shape)}]"


def hlo_signature(loaded: Any) -> dict:
    """What an XLA executable itself says it is: its HLO module's name, each parameter's and
    result's shape (per device, as it runs), and the parameters it may write in place (donated)."""
    try:
        text = loaded.hlo_modules()[0].to_string()
    except Exception as exc:  # a backend that cannot show its module
        raise ArtifactError(f"the compiled program does not describe itself ({exc})") from exc
    header = text.split("\n", 1)[0]
    name = header.split(" ", 2)[1].rstrip(",") if header.startswith("HloModule ") else ""
    layout, alias = _braced(header, "entry_computation_layout="), _braced(header, "input_output_alias=")
    if not name or "->" not in layout:
        raise ArtifactError("the compiled program's module has no entry layout")
    params, _, results = layout.partition("->")
    return {
        "program": name,
        "inputs": [f"{t}[{d}]" for t, d in _SHAPE.findall(params)],
        "outputs": [f"{t}[{d}]" for t, d in _SHAPE.findall(results)],
        "donated": sorted({int(i) for i in _ALIAS.findall(alias)}),
    }


def _braced(text: str, field: str) -> str:
    """The contents of ``field={...}`` in `text` (braces nest), or ""."""
    start = text.find(field + "{")
    if start < 0:
        return ""
    start += len(field) + 1
    depth = 1
    for i in range(start, len(text)):
        depth += {"{": 1, "}": -1}.get(text[i], 0)
        if depth == 0:
            return text[start:i]
    return ""


class Program:
    """A compiled program: call it with its input pytree, get its output pytree back.

    `out_tree` is the outputs' structure, `out_shardings` each flat output's sharding (their
    global shapes follow from the per-device ones the executable returns)."""

    def __init__(self, loaded: Any, out_tree: Any, out_shardings: Sequence[Any], blob: bytes | None = None) -> None:
        self._loaded, self.out_tree, self.out_shardings = loaded, out_tree, list(out_shardings)
        self._blob = blob
        self.signature = hlo_signature(loaded)
        self._single = len(loaded.local_devices()) == 1
        if len(self.signature["outputs"]) != len(self.out_shardings):
            raise ArtifactError(f"the compiled program returns {len(self.signature['outputs'])} arrays, "
                                f"expected {len(self.out_shardings)}")

    @property
    def name(self) -> str:
        """The HLO module's name (``jit_<function name>``)."""
        return self.signature["program"]

    def __call__(self, *args: Any) -> Any:
        import jax

        return self.call_flat(jax.tree.leaves(args))

    def call_flat(self, leaves: list[Any]) -> Any:
        """The call on the input pytree's leaves, in `jax.tree.leaves` order (a caller that keeps
        some inputs' leaves saves flattening them at every call)."""
        import jax

        outs = self._loaded.execute_sharded(leaves).disassemble_into_single_device_arrays()
        if self._single:  # one device: each output is its one buffer
            flat = [o[0] for o in outs]
        else:
            flat = [jax.make_array_from_single_device_arrays(_global_shape(o[0].shape, s), s, o)
                    for o, s in zip(outs, self.out_shardings)]
        return jax.tree.unflatten(self.out_tree, flat)

    def as_text(self) -> str:
        """The compiled (optimized) HLO module."""
        return self._loaded.hlo_modules()[0].to_string()

    def to_bytes(self) -> bytes:
        """``MAGIC``, the JSON header (`signature`), XLA's serialized executable."""
        if self._blob is None:
            try:
                raw = self._loaded.client.serialize_executable(self._loaded)
            except Exception as exc:  # XLA's own error types
                raise ArtifactError(f"this backend cannot serialize compiled programs ({exc})") from exc
            header = json.dumps(self.signature, sort_keys=True).encode()
            self._blob = MAGIC + _LENGTH.pack(len(header)) + header + bytes(raw)
        return self._blob


def from_compiled(compiled: Any, out_tree: Any, out_shardings: Sequence[Any]) -> Program:
    """The `Program` of a freshly compiled ``jax.stages.Compiled``."""
    return Program(compiled.runtime_executable(), out_tree, out_shardings)


def read_header(blob: bytes) -> dict:
    """The signature a program file claims (JSON, checked to be a dict); `ArtifactError` if the
    file is not one nx wrote."""
    if not blob.startswith(MAGIC) or len(blob) < len(MAGIC) + _LENGTH.size:
        raise ArtifactError("not an nx program file (no nx-program header); it was not written by this nx")
    (n,) = _LENGTH.unpack_from(blob, len(MAGIC))
    start = len(MAGIC) + _LENGTH.size
    if n > min(_MAX_HEADER, len(blob) - start):
        raise ArtifactError("the program file's header is cut short")
    try:
        header = json.loads(blob[start : start + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"the program file's header is not JSON ({exc})") from exc
    if not isinstance(header, dict) or not all(k in header for k in ("program", "inputs", "outputs", "donated")):
        raise ArtifactError("the program file's header lacks its signature")
    return header


def from_bytes(blob: bytes, devices: list, out_tree: Any, out_shardings: Sequence[Any]) -> Program:
    """The program in `blob` (`Program.to_bytes` output), loaded onto `devices`. The header must
    match what the executable says of itself. XLA reports bad bytes with its own error types;
    callers turn those into `ArtifactError`."""
    from jax._src.lib import xla_client as xc

    header = read_header(blob)
    start = len(MAGIC) + _LENGTH.size + _LENGTH.unpack_from(blob, len(MAGIC))[0]
    client = devices[0].client
    loaded = client.deserialize_executable(blob[start:], executable_devices=xc.DeviceList(tuple(devices)))
    program = Program(loaded, out_tree, out_shardings, blob=bytes(blob))
    if program.signature != {k: header[k] for k in program.signature}:
        raise ArtifactError(f"the program file's header says it is {header.get('program')!r} with other shapes than "
                            f"the executable it holds ({program.name!r}); the file was altered")
    return program


def _global_shape(local: tuple[int, ...], sharding: Any) -> tuple[int, ...]:
    """The global shape of an array split by a `NamedSharding` into `local`-shaped pieces."""
    spec, mesh = sharding.spec, sharding.mesh
    shape = list(local)
    for dim, axes in enumerate(spec):
        for axis in (axes,) if isinstance(axes, str) else (axes or ()):
            shape[dim] *= mesh.shape[axis]
    return tuple(shape)


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
