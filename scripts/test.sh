#!/usr/bin/env bash
# The whole test suite plus lint and the import contracts (pyproject.toml), as CI runs it.
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
ruff check core plugins tests benchmarks
lint-imports
python -m pytest -q --durations=25 "$@"
