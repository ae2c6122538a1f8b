#!/usr/bin/env bash
# Lint, then the whole test suite (unit + integration against a real broker, Delta and Spark).
# Extra arguments go to pytest, e.g. scripts/test.sh -k profile
#
# Two pytest-xdist workers, each with its own SparkSession, broker, Redis and S3 server, a test
# module at a time (--dist loadfile: a module's fixtures start once): most of the slow tests wait on
# subprocess JVMs, so two of them overlap well even on 2 cores (47 -> 37 minutes here).
# CAROUSEL_TEST_WORKERS=0 runs it in this one process (e.g. to debug with -s / --pdb).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
exec .venv/bin/python -m pytest -n "${CAROUSEL_TEST_WORKERS:-2}" --dist loadfile "$@"
