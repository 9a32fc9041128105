"""Reproduce docs/compare.md: the full comparison table on the default model (SmolLM2-135M) at 20%.

Thin wrapper around ``daprune compare`` so the exact commands live in the repository. Two runs, then a
merge (zero-shot tasks cost far more than perplexity, so they run on a subset of rows):

    export DAPRUNE_DATA_DIR=/work/shared/data
    python benchmarks/compare_table.py                      # every row: params, WikiText-2/PTB, time, memory
    python benchmarks/compare_table.py --zeroshot           # zero-shot columns for the rows in ZS_ROWS
    python benchmarks/compare_table.py --merge docs/compare.json   # one table: print it, write the JSON

The merge also takes the full-set zero-shot runs in ``FULL_ZEROSHOT`` (``benchmarks/zeroshot_bench.py``
JSONs: an hour or more per model here, so only for the dense model and the default pruned one, which is
the "ours-c" row): they add a "Mean, full sets" column and a per-task table of their own.

Extra arguments are passed through to ``daprune compare`` (e.g. ``--rows ours-c,flap`` or
``--max-windows 0`` for all windows). Rows run one per child process; the JSON is rewritten after each
row, and ``--resume`` (on by default here) skips rows already in it, so a stopped run continues.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from daprune.cli import main
from daprune.evaluation.compare import (
    ROWS,
    format_full_zeroshot,
    format_markdown,
    merge_full_zeroshot,
    merge_zeroshot,
    other_rows,
    replace_between,
    table_order,
)

PPL_JSON = "runs/compare/smollm2_s20.json"
ZS_JSON = "runs/compare/smollm2_s20_zeroshot.json"
SEVEN = "boolq,piqa,hellaswag,winogrande,arc_easy,arc_challenge,openbookqa"
ZS_ROWS = "dense,random,l1,l2,ours-sg,taylor-e1,taylor-vector,wanda-sp,flap,ours-c,ours-c-rec"
# --channel-multiple 1: every row removes exactly the same count (the default rounds kept widths to 16)
PPL = ["compare", "--sparsity", "0.2", "--channel-multiple", "1", "--max-windows", "256", "--json", PPL_JSON,
       "--resume", "--quiet"]
ZEROSHOT = ["compare", "--sparsity", "0.2", "--channel-multiple", "1", "--rows", ZS_ROWS, "--ppl=", "--tasks", SEVEN,
            "--limit", "100", "--zeroshot-dtype", "bfloat16", "--json", ZS_JSON, "--resume", "--quiet"]
# full seven-task runs (zeroshot_bench.py --dtype bf16 --batch-size 8 --threads 2, no --limit), by comparison row:
# dense, ours and the best peer (Wanda-sp). bf16 needs a CPU with native bf16 (AVX512-BF16/AMX): without it
# bf16 matmuls are ~30x slower than fp32 and a full run takes a day
FULL_ZEROSHOT = {"dense": "docs/zeroshot_dense_full.json", "ours-c": "docs/zeroshot_pruned_full.json",
                 "wanda-sp": "docs/zeroshot_wanda-sp_full.json"}

# Gemma-3-270M: the first 1000 documents per task (a full set costs hours per model here), same settings otherwise;
# ours is its best row at 256 windows (self-generated calibration, held-out-chosen re-fit), the best peer E1
GEMMA_FIRST1000 = {"dense": "docs/zeroshot_gemma3_dense_limit1000.json",
                   "ours-sg-hrec": "docs/zeroshot_gemma3_ours-sg-hrec_limit1000.json",
                   "taylor-e1": "docs/zeroshot_gemma3_taylor-e1_limit1000.json"}

TABLE = "<!-- table: written by benchmarks/compare_table.py --merge -->", "<!-- /table -->"
FULL_TABLE = "<!-- full zero-shot: written by benchmarks/compare_table.py --merge -->", "<!-- /full zero-shot -->"
# where each table's runs are: one JSON, or a folder of one JSON per row (rows run one at a time, e.g. Gemma-3:
# `daprune compare --model gemma3-270m.gguf --sparsity-basis blocks --channel-multiple 1 --rows ROW
# --json runs/compare/gemma3_s20/ROW.json`, zero-shot rows likewise into gemma3_s20_zs/)
TABLES = {"smollm2": {"ppl": PPL_JSON, "zs": ZS_JSON, "doc": "docs/compare.md", "full": FULL_ZEROSHOT},
          "gemma3": {"ppl": "runs/compare/gemma3_s20", "zs": "runs/compare/gemma3_s20_zs", "doc": "docs/gemma3.md",
                     "full": GEMMA_FIRST1000, "full_limit": 1000}}


def load_runs(path: str) -> dict:
    """A compare JSON, or a folder of per-row compare JSONs combined into one (rows in the table's order; the
    run settings of the first row's file, with every row's own command kept)."""
    p = Path(path)
    if not p.exists():
        return {"rows": []}
    if p.is_file():
        return json.loads(p.read_text())
    runs = [json.loads(f.read_text()) for f in sorted(p.glob("*.json"))]
    if not runs:
        return {"rows": []}
    rows = table_order([dict(r, command=run.get("command")) for run in runs for r in run["rows"]])
    return {**runs[0], "rows": rows, "command": "one daprune compare per row (each row's command is in the row)"}


def with_published(table: dict, out: Path) -> dict:
    """The runs' rows plus the rows of the last published merge (``out``) that no run replaces, when both were
    measured the same way: the runs live in an ignored folder, so a fresh checkout that runs one new row must
    add it to the published table, not publish a table of one row."""
    if not out.is_file():
        return table
    published = json.loads(out.read_text())
    if not table.get("rows"):
        return published
    kept = other_rows(published, table, [r for r in ROWS if r.key in {row["key"] for row in table["rows"]}])
    rows = table_order(table["rows"] + kept)
    # a run without zero-shot tasks says nothing about the published zero-shot run's settings
    zs = table.get("zeroshot_run") if (table.get("zeroshot_run") or {}).get("tasks") else published.get("zeroshot_run")
    return {**published, **table, "rows": rows, "zeroshot_run": zs}


def merge(out: str, which: str = "smollm2") -> int:
    """One table from the runs: written as JSON to ``out`` and between the markers of the table's doc page."""
    spec = TABLES[which]
    table = with_published(merge_zeroshot(load_runs(spec["ppl"]), load_runs(spec["zs"])), Path(out))
    full = {key: json.loads(Path(f).read_text()) for key, f in spec["full"].items() if Path(f).is_file()}
    table = merge_full_zeroshot(table, full, spec.get("full_limit"))
    Path(out).write_text(json.dumps(table, indent=1) + "\n")
    markdown, full_markdown = format_markdown(table), format_full_zeroshot(table)
    print(markdown + "\n\n" + full_markdown)
    doc = Path(spec["doc"])
    if doc.is_file():
        text = replace_between(doc.read_text(), TABLE, markdown)
        doc.write_text(replace_between(text, FULL_TABLE, full_markdown))
    return 0


if __name__ == "__main__":
    argv = sys.argv[1:]
    if argv[:1] == ["--merge"]:  # --merge OUT.json [smollm2|gemma3]
        sys.exit(merge(argv[1], *argv[2:3]))
    if argv[:1] == ["--zeroshot"]:
        sys.exit(main(ZEROSHOT + argv[1:]))
    sys.exit(main(PPL + argv))  # later options win: extra arguments override the defaults
