#!/usr/bin/env bash
# Set up, lint, type-check and run the whole test suite (slow tests included).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
ruff check kfe plugins tests benchmarks
ruff format --check kfe plugins tests benchmarks
mypy kfe
python3 -m pytest -q
