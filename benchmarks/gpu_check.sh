#!/bin/bash
# The GPU check of the cuda backend, for a machine with an NVIDIA GPU, jax[cuda], torch and
# transformers but no package registry (the lent H100/H200 machines).
#
#   bash benchmarks/gpu_check.sh prepare   # here: wheels of nx and its missing pure deps -> .gpu/whl
#   bash benchmarks/gpu_check.sh run       # there, with .gpu carried: tests + decode speed -> $OUT
#
# `run` installs the wheels into /tmp/site, then: the XLA GPU flags it can set (flags.txt), the
# 1B-shape bf16 decode at 1 and 8 decode steps per program call under XLA's default flags, with
# while loops as CUDA-graph command buffers, and with every command sequence as a graph
# (gpu-*.json), and tests/system/test_cuda.py (test_cuda.log). Each part has its own time limit,
# so one failure leaves the others' results.
set -u
cd "$(dirname "$0")/.."
case "${1:-}" in
prepare)
  mkdir -p .gpu/whl && grep -qx "/.gpu/" .git/info/exclude 2>/dev/null || echo "/.gpu/" >> .git/info/exclude
  rm -f .gpu/whl/*.whl
  .venv/bin/pip wheel -q --no-deps -w .gpu/whl ./core ./plugins/* || exit 1
  pins=$(.venv/bin/python -c "import importlib.metadata as m; print(' '.join(f'{n}=={m.version(n)}' for n in
    ('pydantic', 'pydantic_core', 'typing_inspection', 'annotated_types', 'typing_extensions', 'gguf')))")
  # shellcheck disable=SC2086
  .venv/bin/pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .gpu/whl $pins || exit 1
  ls .gpu/whl ;;
run)
  export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false TOKENIZERS_PARALLELISM=false
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .gpu/whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$PWD
  out=${OUT:-benchmarks/results}
  exec > >(tee -a "$out/gpu_check.log") 2>&1
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  python3 -c "import jax, torch, transformers; print('jax', jax.__version__, 'torch', torch.__version__,
    'transformers', transformers.__version__, jax.devices())"
  XLA_FLAGS=--help timeout 60 python3 -c "import jax; jax.devices('cuda')" 2>&1 \
    | grep -E "xla_gpu_(enable_command_buffer|graph|enable_while|command_buffer)" -A2 > "$out/flags.txt"
  head -c 3000 "$out/flags.txt"
  mkdir -p /tmp/nx-ckpt
  bench="python3 benchmarks/gpu.py --models llama-3.2-1b --dtypes bf16 --engines nx --checkpoints /tmp/nx-ckpt
    --new-tokens 128 --repeats 3"
  echo "== default flags"
  timeout 150 $bench --batch-sizes 1,8 --decode-steps 1,8 --out "$out/gpu-default.json"
  echo "== while loops as command buffers"
  XLA_FLAGS="--xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
    timeout 100 $bench --batch-sizes 1 --decode-steps 1,8 --out "$out/gpu-while.json"
  echo "== every command sequence a graph"
  XLA_FLAGS="--xla_gpu_graph_min_graph_size=1 --xla_gpu_enable_command_buffer=+WHILE,+CONDITIONAL" \
    timeout 100 $bench --batch-sizes 1 --decode-steps 1,8 --out "$out/gpu-graph1.json"
  echo "== tests/system/test_cuda.py"; date -u
  timeout 200 python3 -m pytest -q -p no:cacheprovider -n 4 tests/system/test_cuda.py 2>&1 | tail -30 \
    > "$out/test_cuda.log"
  cat "$out/test_cuda.log"; date -u ;;
*) echo "usage: bash benchmarks/gpu_check.sh prepare|run" >&2; exit 2 ;;
esac
