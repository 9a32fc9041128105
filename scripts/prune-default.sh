#!/usr/bin/env bash
# The main job: set up, prune the embedded SmolLM2-135M-Instruct by 20% and print the report.
# Extra arguments go to `daprune prune` (e.g. --recovery post, --calibration self).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ -z "${DAPRUNE_DATA_DIR:-}" ] && [ -d ../shared/data ]; then export DAPRUNE_DATA_DIR="$(cd ../shared/data && pwd)"; fi
EVAL=()
if [ -n "${DAPRUNE_DATA_DIR:-}" ]; then EVAL=(--eval wikitext2,ptb --max-windows 128); fi
daprune prune --out out/smollm2-135m-pruned20 --overwrite --sparsity 0.2 "${EVAL[@]}" "$@"
