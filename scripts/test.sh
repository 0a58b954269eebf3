#!/usr/bin/env bash
# The whole test suite plus lint, as CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ruff check core plugins tests benchmarks
python -m pytest -q "$@"
