"""HLO dumps: every program nx compiles, as HLO text and as a serialized ``HloModuleProto``.

Set ``NX_DUMP_TO=dir`` (like ``NEURONX_DUMP_TO``) or run ``nx compile --dump-hlo dir``. For each
program ``<name>`` (``prefill_b1_t64_w128``, ``decode_b1_w256``, see `program_name`) nx writes:

- ``<name>.hlo.txt``: the HLO module as text (before XLA's optimizations),
- ``<name>.hlo.pb``: the same module as a serialized ``HloModuleProto`` (what XLA-based compilers
  such as ``neuronx-cc`` take as input),
- ``<name>.json``: the entry parameters in order: which flattened input (dotted name, shape,
  dtype) each HLO parameter is; inputs the program does not read are pruned by jax and listed as
  ``unused``.

`load_proto` / `compile_proto` read a dumped ``.hlo.pb`` back and compile it with XLA for a
device, which is how the test suite checks the round trip.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from nx.buckets import ProgramKey

ENV = "NX_DUMP_TO"


def program_name(rows: int, n_tokens: int, window: int, sample: bool = False, insert: bool = False,
                 steps: int = 1) -> str:
    """``prefill_b<rows>_t<tokens>_w<window>``, ``decode_b<rows>_w<window>`` (``_k<steps>`` for a
    multi-step decode program) or ``insert_t<tokens>_w<window>`` (+ ``_sample``)."""
    return ProgramKey(rows, n_tokens, window, sample, insert, steps).name


def _input_names(lowered: Any) -> list[dict]:
    import jax

    args = lowered.args_info  # ((params, caches, inputs, sampling[, block]), {})
    flat = jax.tree_util.tree_flatten_with_path(args)[0]
    out = []
    for path, info in flat:
        parts = [str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path]
        parts = parts[1:] if parts and parts[0] == "0" else parts  # drop the (args, kwargs) level
        top = {"0": "params", "1": "caches", "2": "inputs", "3": "sampling", "4": "block"}.get(parts[0], parts[0]) if parts else ""
        out.append({
            "name": ".".join([top, *parts[1:]]),
            "shape": list(info.shape),
            "dtype": str(info.dtype),
            "donated": bool(getattr(info, "donated", False)),
        })
    return out


def dump_lowered(lowered: Any, directory: str | os.PathLike, name: str, xla_options: dict | None = None) -> list[Path]:
    """Write one lowered program's HLO text, ``HloModuleProto`` and parameter map (with the XLA
    compiler options nx compiles it with); returns the files."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    hlo = lowered.compiler_ir("hlo")  # an XlaComputation
    text, proto = out / f"{name}.hlo.txt", out / f"{name}.hlo.pb"
    text.write_text(hlo.as_hlo_text())
    proto.write_bytes(hlo.as_serialized_hlo_module_proto())
    inputs = _input_names(lowered)
    kept = lowered._lowering.compile_args.get("kept_var_idx")
    kept = sorted(kept) if kept is not None else list(range(len(inputs)))
    meta = {
        "program": name,
        "parameters": [inputs[i] for i in kept],
        "unused": [inputs[i]["name"] for i in range(len(inputs)) if i not in set(kept)],
        "outputs": ["next_tokens", "logits", "caches", "seen"],
        "xla_options": dict(xla_options or {}),
    }
    side = out / f"{name}.json"
    side.write_text(json.dumps(meta, indent=1))
    return [text, proto, side]


def kept_inputs(lowered: Any) -> list[int]:
    """Indices (into the flattened program inputs) of the HLO entry parameters, in order."""
    import jax

    kept = lowered._lowering.compile_args.get("kept_var_idx")
    n = len(jax.tree.leaves(lowered.args_info))
    return sorted(kept) if kept is not None else list(range(n))


def load_proto(file: str | os.PathLike) -> Any:
    """A dumped ``.hlo.pb`` as an ``XlaComputation`` (``.as_hlo_text()``, ``.program_shape()``)."""
    from jax._src.lib import xla_client as xc

    return xc.XlaComputation(Path(file).read_bytes())


def compile_proto(file: str | os.PathLike, device: Any = None) -> Any:
    """Compile a dumped ``HloModuleProto`` for `device` (default: the first CPU device) with XLA and
    the compiler options recorded beside it; returns a loaded executable whose
    ``execute(list_of_arrays)`` runs it (arrays in entry parameter order, see the ``.json``)."""
    import jax
    from jax._src.lib import xla_client as xc

    device = device or jax.devices("cpu")[0]
    module = xc._xla.mlir.hlo_to_stablehlo(Path(file).read_bytes())
    side = Path(file).with_suffix("").with_suffix(".json")
    options = xc.CompileOptions()
    if side.exists():
        options.env_option_overrides = list(json.loads(side.read_text()).get("xla_options", {}).items())
    return device.client.compile_and_load(module, xc.DeviceList((device,)), options)
