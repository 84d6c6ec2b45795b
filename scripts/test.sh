#!/usr/bin/env bash
# The project's test command: lint, type-check, the import contract, then the test suite
# against real oxenstored.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check shyped tests benchmarks
.venv/bin/ruff format --check shyped tests benchmarks
.venv/bin/mypy
.venv/bin/lint-imports --no-cache  # the layering contract in pyproject.toml
.venv/bin/python -m pytest -q "$@"
