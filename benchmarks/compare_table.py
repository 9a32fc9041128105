"""Reproduce docs/compare.md: the full comparison table on the default model (SmolLM2-135M) at 20%.

Thin wrapper around ``daprune compare`` so the exact command lives in the repository:

    DAPRUNE_DATA_DIR=/work/shared/data nice -n 10 python benchmarks/compare_table.py

Extra arguments are passed through (e.g. ``--rows ours-c,flap`` or ``--max-windows 0`` for all windows).
Rows run one per child process; the JSON is rewritten after each row, and ``--resume`` (on by default
here) skips rows already in it, so a stopped run continues where it was.
"""

from __future__ import annotations

import sys

from daprune.cli import main

DEFAULT = ["compare", "--sparsity", "0.2", "--max-windows", "256", "--json", "runs/compare/smollm2_s20.json",
           "--resume", "--quiet"]

if __name__ == "__main__":
    sys.exit(main(DEFAULT + sys.argv[1:]))  # later options win: extra arguments override the defaults
