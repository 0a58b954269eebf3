"""Rewrite a GGUF file at another precision (f32, bf16, q8_0, q4_0) with the `gguf` package alone, so
llama.cpp's tools can run the same weights nx runs without llama-cpp-python's quantize API.

    python benchmarks/gguf_convert.py SRC.gguf DST.gguf --precision f32

Every metadata field is copied; each tensor is dequantized (gguf's reference dequantizers) and
written at `precision` (1-D tensors, the norms, stay f32 as llama.cpp's converter keeps them).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

PRECISIONS = {"f32": (Q.F32, 0), "bf16": (Q.BF16, 32), "q8_0": (Q.Q8_0, 7), "q4_0": (Q.Q4_0, 2)}  # (type, general.file_type)


def convert(src: Path, dst: Path, precision: str) -> Path:
    """`src` rewritten as `precision` into `dst` (returned); an existing non-empty `dst` is kept."""
    if dst.exists() and dst.stat().st_size > 0:
        return dst
    qtype, file_type = PRECISIONS[precision]
    reader = gguf.GGUFReader(src, "r")
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    dst.parent.mkdir(parents=True, exist_ok=True)  # a fresh machine has no cache folder yet
    tmp = dst.with_suffix(".partial")
    writer = gguf.GGUFWriter(tmp, arch)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue
        value = file_type if field.name == gguf.Keys.General.FILE_TYPE else field.contents()
        kind = field.types[0]
        writer.add_key_value(field.name, value, kind, sub_type=field.types[-1] if kind == gguf.GGUFValueType.ARRAY else None)
    for t in reader.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        if data.ndim >= 2 and qtype != Q.F32:
            writer.add_tensor(t.name, gguf.quants.quantize(data, qtype), raw_dtype=qtype)
        else:
            writer.add_tensor(t.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    tmp.rename(dst)
    return dst


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("src", type=Path)
    ap.add_argument("dst", type=Path)
    ap.add_argument("--precision", choices=sorted(PRECISIONS), default="f32")
    args = ap.parse_args()
    print(convert(args.src, args.dst, args.precision))


if __name__ == "__main__":
    main()
