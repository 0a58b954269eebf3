"""A 1B-class llama with random weights, as llama.cpp users get one: an HF checkpoint converted by
llama.cpp's own ``convert_hf_to_gguf.py`` (from the llama.cpp source in the llama-cpp-python sdist).

    python benchmarks/llama_shape.py [--shape 1b] [--precisions f32,bf16,q8_0,q4_0]

Llama-3.2-1B's shape (16 layers, hidden 2048, MLP 8192, 32 query / 8 key-value heads, vocabulary
128256, tied embeddings), weights drawn from N(0, 0.02) with a fixed seed and saved as bf16
safetensors, the tokenizer SmolLM2's (from the shipped GGUF; the converter pads the vocabulary to
128256 with unused tokens). The f32 GGUF comes from the converter; the other precisions are
written from it by `gguf_convert.convert` (the `gguf` package's reference quantizers). Files are
cached under ``--cache-dir``; the paths are printed one per line.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tarfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gguf_convert import PRECISIONS, convert  # noqa: E402

LLAMA_CPP_PYTHON = "0.3.36"
SHAPES = {
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, rope_theta=500000.0, rms_norm_eps=1e-5,
               max_position_embeddings=8192, tie_word_embeddings=True),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, vocab_size=49152, rope_theta=10000.0, rms_norm_eps=1e-5,
                 max_position_embeddings=512, tie_word_embeddings=True),
}


def log(msg: str) -> None:
    print(f"[llama-shape {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def llama_cpp_source(cache_dir: Path) -> Path:
    """llama.cpp's source tree from the llama-cpp-python sdist (downloaded from the package index once)."""
    root = cache_dir / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}"
    tree = root / "vendor" / "llama.cpp"
    if (tree / "convert_hf_to_gguf.py").is_file():
        return tree
    (cache_dir / "src").mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-binary", ":all:", "--no-deps",
                    f"llama-cpp-python=={LLAMA_CPP_PYTHON}", "-d", str(cache_dir / "src")], check=True)
    with tarfile.open(cache_dir / "src" / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
        tar.extractall(cache_dir / "src", filter="data")
    return tree


def hf_checkpoint(shape: str, out: Path, tokenizer_gguf: Path) -> Path:
    """Random-weight llama of `shape` with SmolLM2's tokenizer, saved as bf16 safetensors in `out`."""
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    log(f"writing a random {shape} llama to {out}")
    torch.manual_seed(0)
    config = LlamaConfig(**SHAPES[shape], bos_token_id=1, eos_token_id=2, torch_dtype="bfloat16")
    with torch.device("cpu"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02)
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(tokenizer_gguf.parent), gguf_file=tokenizer_gguf.name).save_pretrained(tmp)
    tmp.rename(out)
    return out


def convert_hf(checkpoint: Path, dst: Path, cache_dir: Path) -> Path:
    """`checkpoint` as an f32 GGUF by llama.cpp's convert_hf_to_gguf.py (with its own gguf-py)."""
    if dst.is_file() and dst.stat().st_size > 0:
        return dst
    tree = llama_cpp_source(cache_dir)
    log(f"convert_hf_to_gguf.py {checkpoint.name} -> {dst.name}")
    tmp = dst.with_suffix(".partial")
    subprocess.run([sys.executable, str(tree / "convert_hf_to_gguf.py"), str(checkpoint), "--outtype", "f32",
                    "--outfile", str(tmp)], check=True)
    tmp.rename(dst)
    return dst


def build(shape: str, precisions: list[str], cache_dir: Path, tokenizer_gguf: Path) -> dict[str, Path]:
    """The GGUF file of each precision (f32 from the converter, the others from it)."""
    ckpt = hf_checkpoint(shape, cache_dir / f"llama-{shape}-random", tokenizer_gguf)
    f32 = convert_hf(ckpt, cache_dir / f"llama-{shape}-random.f32.gguf", cache_dir)
    out = {}
    for p in precisions:
        out[p] = f32 if p == "f32" else convert(f32, cache_dir / f"llama-{shape}-random.{p}.gguf", p)
    return out


def main() -> None:
    from compare import smollm2_gguf

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="1b")
    ap.add_argument("--precisions", default="f32,bf16,q8_0,q4_0", help=f"of {', '.join(PRECISIONS)}")
    ap.add_argument("--cache-dir", type=Path, default=Path.home() / ".cache" / "nx-bench")
    args = ap.parse_args()
    for path in build(args.shape, args.precisions.split(","), args.cache_dir, smollm2_gguf()).values():
        print(path)


if __name__ == "__main__":
    main()
