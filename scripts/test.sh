#!/usr/bin/env bash
# Lint, then the whole test suite (unit + integration against a real broker, Delta and Spark).
# Extra arguments go to pytest, e.g. scripts/test.sh -k profile
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest "$@"
