"""Reproduce docs/compare.md: the full comparison table on the default model (SmolLM2-135M) at 20%.

Thin wrapper around ``daprune compare`` so the exact commands live in the repository. Two runs, then a
merge (zero-shot tasks cost far more than perplexity, so they run on a subset of rows):

    export DAPRUNE_DATA_DIR=/work/shared/data
    python benchmarks/compare_table.py                      # every row: params, WikiText-2/PTB, time, memory
    python benchmarks/compare_table.py --zeroshot           # zero-shot columns for the rows in ZS_ROWS
    python benchmarks/compare_table.py --merge docs/compare.json   # one table: print it, write the JSON

Extra arguments are passed through to ``daprune compare`` (e.g. ``--rows ours-c,flap`` or
``--max-windows 0`` for all windows). Rows run one per child process; the JSON is rewritten after each
row, and ``--resume`` (on by default here) skips rows already in it, so a stopped run continues.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from daprune.cli import main
from daprune.evaluation.compare import format_markdown, merge_zeroshot

PPL_JSON = "runs/compare/smollm2_s20.json"
ZS_JSON = "runs/compare/smollm2_s20_zeroshot.json"
SEVEN = "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"
ZS_ROWS = "dense,random,l1,l2,ours-sg,taylor-e1,taylor-vector,wanda-sp,flap,ours-c,ours-c-rec"
PPL = ["compare", "--sparsity", "0.2", "--max-windows", "256", "--json", PPL_JSON, "--resume", "--quiet"]
ZEROSHOT = ["compare", "--sparsity", "0.2", "--rows", ZS_ROWS, "--ppl=", "--tasks", SEVEN, "--limit", "100",
            "--zeroshot-dtype", "bfloat16", "--json", ZS_JSON, "--resume", "--quiet"]


DOC = Path("docs/compare.md")
BEGIN, END = "<!-- table: written by benchmarks/compare_table.py --merge -->", "<!-- /table -->"


def merge(out: str) -> int:
    """One table from the two runs: written as JSON to ``out`` and between the markers of docs/compare.md."""
    zs = json.loads(Path(ZS_JSON).read_text()) if Path(ZS_JSON).is_file() else {"rows": []}
    table = merge_zeroshot(json.loads(Path(PPL_JSON).read_text()), zs)
    Path(out).write_text(json.dumps(table, indent=1) + "\n")
    markdown = format_markdown(table)
    print(markdown)
    if DOC.is_file() and BEGIN in DOC.read_text():
        text = DOC.read_text()
        head, rest = text.split(BEGIN, 1)
        DOC.write_text(head + BEGIN + "\n" + markdown + "\n" + END + rest.split(END, 1)[1])
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--merge"]:
        sys.exit(merge(argv[1]))
    if argv[:1] == ["--zeroshot"]:
        sys.exit(main(ZEROSHOT + argv[1:]))
    sys.exit(main(PPL + argv))  # later options win: extra arguments override the defaults
