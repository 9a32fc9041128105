#!/usr/bin/env bash
# Set up and run the test suite (fast tests plus a representative real-model subset).
# `bash scripts/test.sh -m slow` runs only the slow real-model tests; `-m ''` runs everything.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ -z "${DAPRUNE_DATA_DIR:-}" ] && [ -d ../shared/data ]; then export DAPRUNE_DATA_DIR="$(cd ../shared/data && pwd)"; fi
export DAPRUNE_CACHE="${DAPRUNE_CACHE:-$PWD/.cache}"
ruff check src tests benchmarks examples
python -m pytest -q "$@"
