"""Quality cost of one setting at a time, on real models: the output layout and --channel-multiple
(suite ``layout``, docs/layout.md) and the quality levers of issue "Quality" (suites ``quality`` and
``calibration``, docs/quality.md).

Each row is one plain ``daprune prune`` (20% removed; SmolLM2 of all parameters, Gemma-3-270M of the block
parameters) with one setting changed, evaluated by the same run (``--eval``: held-out LAMBADA passages,
WikiText-2 and PTB, evenly spaced 128-token windows). Rows run one at a time in child processes; the JSON
is rewritten after each row and rows already in it are skipped, so a stopped run continues.

    export DAPRUNE_DATA_DIR=/work/shared/data
    python benchmarks/settings_bench.py smollm2                  # layout suite: docs/layout_smollm2.json
    python benchmarks/settings_bench.py gemma3 --model gemma3-270m.gguf
    python benchmarks/settings_bench.py smollm2 --suite quality  # docs/quality_smollm2.json
    python benchmarks/settings_bench.py smollm2 --table-only     # print the table of a finished run

The dense row is ``daprune eval`` on the same windows. Tune on the held-out LAMBADA column only: WikiText-2
and PTB are test data.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

CORPORA = "lambada-heldout,wikitext2,ptb"
# the calibration-text suite also scores held-out CoQA (stories, exams, Wikipedia, literature, news): a text choice
# is judged on both held-out corpora, each one calibration source's own domain
SUITE_CORPORA = {"calibration": "lambada-heldout,coqa-heldout,wikitext2,ptb"}
LABELS = {"lambada-heldout": "LAMBADA (held-out)", "coqa-heldout": "CoQA (held-out)",
          "wiki-heldout": "Wikipedia (held-out)", "wikitext2": "WikiText-2", "ptb": "PTB"}
M1 = ["--channel-multiple", "1"]  # quality rows: comparable with docs/compare.md
HELDOUT_REC = ["--recovery", "heldout", "--heldout-nsamples", "16"]
POST = ["--recovery", "post", "--recovery-prior", "original"]  # re-fit the kept columns, ridge toward them
BLOCK = ["--recovery-target", "block"]
SG095 = ["--calibration", "self", "--self-top-p", "0.95"]  # self-generated at the sampling default until 2026-12-03
P095 = ["--self-top-p", "0.95"]  # rows with self-generated text measured under that default keep it
FISHER = ["--error-weight", "fisher"]
KFAC = ["--error-weight", "kfac"]
SG128P1 = ["--calibration", "self", "--nsamples", "128", "--self-top-p", "1"]
WANDA_SP = ["--ffn-criterion", "wanda-sp", "--head-criterion", "wanda-sp", "--selection", "score"]
SUITES = {
    "layout": {  # name: extra prune arguments (per-layer: the default layout; mN: --channel-multiple N)
        "per-layer": M1,
        "uniform": ["--layout", "uniform", *M1],
        "per-layer m8": ["--channel-multiple", "8"],
        "per-layer m16": ["--channel-multiple", "16"],
        "per-layer m32": ["--channel-multiple", "32"],
        "per-layer m64": ["--channel-multiple", "64"],
        "uniform m64": ["--layout", "uniform", "--channel-multiple", "64"],
    },
    "quality": {
        "paper 4:-2": M1,
        "sensitivity": ["--schedule", "sensitivity", *M1],
        "adaptive (FLAP)": ["--schedule", "adaptive", *M1],
        "owl (4:-2)": ["--schedule", "owl", *M1],
        "owl (every block)": ["--schedule", "owl", "--layers", "0:", *M1],
        "heldout recovery": [*HELDOUT_REC, *M1],
        "heldout recovery, 128 re-fit samples": [*HELDOUT_REC, "--recovery-nsamples", "128", *M1],
        "128 samples": ["--nsamples", "128", *M1],
        "128 samples + heldout recovery": ["--nsamples", "128", *HELDOUT_REC, *M1],
        "sensitivity + heldout recovery": ["--schedule", "sensitivity", *HELDOUT_REC, *M1],
        "lambada+self": ["--calibration", "lambada+self", *P095, *M1],
        "128 samples, lambada+self": ["--nsamples", "128", "--calibration", "lambada+self", *P095, *M1],
        "lambada+self + heldout recovery": ["--calibration", "lambada+self", *P095, *HELDOUT_REC, *M1],
        "mean compensation": ["--compensate-mean", *M1],
        # the rows named without a top-p ran while top-p 0.95 was the sampling default: they keep it
        "self-generated": [*SG095, *M1],
        "self-generated + heldout recovery": [*SG095, *HELDOUT_REC, *M1],
        "self-generated + sensitivity + heldout recovery": [*SG095, "--schedule", "sensitivity", *HELDOUT_REC, *M1],
        # more self-generated text: OBS compensation switches on at 128 samples, as with book text
        "self-generated, 128 samples": [*SG095, "--nsamples", "128", *M1],
        "self-generated, 128 samples + heldout recovery": [*SG095, "--nsamples", "128", *HELDOUT_REC, *M1],
        # how the model's own text is sampled (default since then: top-p 1, temperature 1)
        "self-generated, top-p 1": ["--calibration", "self", "--self-top-p", "1", *M1],
        "self-generated, 128 samples, top-p 1": ["--calibration", "self", "--nsamples", "128", "--self-top-p", "1",
                                                 *M1],
        "self-generated, 128 samples, temperature 0.8": [*SG095, "--nsamples", "128", "--self-temperature", "0.8",
                                                         *M1],
        "self-generated, 128 samples, top-p 1, temperature 1.2": ["--calibration", "self", "--nsamples", "128",
                                                                  "--self-top-p", "1", "--self-temperature", "1.2",
                                                                  *M1],
        # the output error weighted by the loss's sensitivity to each output dimension (--error-weight fisher)
        "self-generated, top-p 1, fisher": ["--calibration", "self", "--self-top-p", "1", *FISHER, *M1],
        "self-generated, 128 samples, top-p 1, fisher": ["--calibration", "self", "--nsamples", "128", "--self-top-p",
                                                         "1", *FISHER, *M1],
        "fisher": [*FISHER, *M1],
        "self-generated, 128 samples, top-p 1, fisher + heldout recovery": [*SG128P1, *FISHER, *HELDOUT_REC, *M1],
        # the same with the whole output-side matrix E[g g^T] (--error-weight kfac)
        "self-generated, top-p 1, kfac": ["--calibration", "self", "--self-top-p", "1", *KFAC, *M1],
        "self-generated, 128 samples, top-p 1, kfac": [*SG128P1, *KFAC, *M1],
        "kfac": [*KFAC, *M1],
        # the gradient pass on 16 of the 128 rows (--fisher-nsamples)
        "self-generated, 128 samples, top-p 1, fisher from 16 rows": [*SG128P1, *FISHER, "--fisher-nsamples", "16",
                                                                      *M1],
        "self-generated, 128 samples, top-p 1, fisher + sensitivity": [*SG128P1, *FISHER, "--schedule", "sensitivity",
                                                                       *M1],
    },
    "calibration": {  # which text the statistics and re-fits see (default: lambada, book text)
        "lambada": M1,
        "coqa": ["--calibration", "coqa", *M1],
        "lambada+coqa": ["--calibration", "lambada+coqa", *M1],
        "coqa+self": ["--calibration", "coqa+self", *P095, *M1],
        "coqa + heldout recovery": ["--calibration", "coqa", *HELDOUT_REC, *M1],
        "lambada, 128 samples": ["--nsamples", "128", *M1],
        "coqa, 128 samples": ["--calibration", "coqa", "--nsamples", "128", *M1],
        "coqa, 128 samples + heldout recovery": ["--calibration", "coqa", "--nsamples", "128", *HELDOUT_REC, *M1],
        "lambada+coqa + heldout recovery": ["--calibration", "lambada+coqa", *HELDOUT_REC, *M1],
        "mean compensation": ["--compensate-mean", *M1],
        "coqa+self + heldout recovery": ["--calibration", "coqa+self", *P095, *HELDOUT_REC, *M1],
        "lambada+coqa+self": ["--calibration", "lambada+coqa+self", *P095, *M1],
        "lambada+coqa+self + heldout recovery": ["--calibration", "lambada+coqa+self", *P095, *HELDOUT_REC, *M1],
        "lambada+coqa, 128 samples": ["--calibration", "lambada+coqa", "--nsamples", "128", *M1],
        "lambada+coqa, 256 samples": ["--calibration", "lambada+coqa", "--nsamples", "256", *M1],
        "lambada+coqa+self, 128 samples": ["--calibration", "lambada+coqa+self", *P095, "--nsamples", "128", *M1],
        "lambada+self, 128 samples": ["--calibration", "lambada+self", *P095, "--nsamples", "128", *M1],
        "coqa+self, 128 samples": ["--calibration", "coqa+self", *P095, "--nsamples", "128", *M1],
        "coqa, 256 samples": ["--calibration", "coqa", "--nsamples", "256", *M1],
        "coqa, 128 samples, seqlen 256": ["--calibration", "coqa", "--nsamples", "128", "--seqlen", "256", *M1],
        "lambada+coqa, 128 samples, seqlen 256": ["--calibration", "lambada+coqa", "--nsamples", "128", "--seqlen",
                                                  "256", *M1],
        # calibration volume: 32k, 64k and 128k tokens of the same mix
        "lambada+coqa, 256 samples, seqlen 256": ["--calibration", "lambada+coqa", "--nsamples", "256", "--seqlen",
                                                  "256", *M1],
        "lambada+coqa, 512 samples, seqlen 256": ["--calibration", "lambada+coqa", "--nsamples", "512", "--seqlen",
                                                  "256", *M1],
        # re-fit down_proj to the dense down_proj's output (linear) or to the dense block's output (block)
        "lambada+coqa, 128 samples + post recovery": ["--calibration", "lambada+coqa", "--nsamples", "128", *POST,
                                                      *M1],
        "lambada+coqa, 128 samples + post recovery, block target": ["--calibration", "lambada+coqa", "--nsamples",
                                                                    "128", *POST, *BLOCK, *M1],
        "lambada+coqa + heldout recovery, block target": ["--calibration", "lambada+coqa", *HELDOUT_REC, *BLOCK, *M1],
        "heldout recovery": [*HELDOUT_REC, *M1],
        "heldout recovery, block target": [*HELDOUT_REC, *BLOCK, *M1],
        "mean compensation, lambada+coqa + heldout recovery, block target": [
            "--compensate-mean", "--calibration", "lambada+coqa", *HELDOUT_REC, *BLOCK, *M1],
        "lambada+coqa, 128 samples + heldout recovery, block target": ["--calibration", "lambada+coqa", "--nsamples",
                                                                       "128", *HELDOUT_REC, *BLOCK, *M1],
        "lambada+coqa, 512 samples, seqlen 256 + post recovery": ["--calibration", "lambada+coqa", "--nsamples", "512",
                                                                  "--seqlen", "256", *POST, *M1],
        "lambada+coqa, 512 samples, seqlen 256 + post recovery, block target": [
            "--calibration", "lambada+coqa", "--nsamples", "512", "--seqlen", "256", *POST, *BLOCK, *M1],
        "lambada+coqa, 128 samples + sensitivity": ["--calibration", "lambada+coqa", "--nsamples", "128", "--schedule",
                                                    "sensitivity", *M1],
        "lambada+coqa, 128 samples + sensitivity on 16 rows": ["--calibration", "lambada+coqa", "--nsamples", "128",
                                                               "--schedule", "sensitivity", "--sensitivity-nsamples",
                                                               "16", *M1],
        "lambada+coqa+self, 128 samples + sensitivity": ["--calibration", "lambada+coqa+self", *P095, "--nsamples",
                                                         "128",
                                                         "--schedule", "sensitivity", *M1],
        # the head/FFN split of each block: estimated (default), measured on trial copies, or no heads at all
        "head split measured": ["--head-split", "measured", *M1],
        "head split measured + heldout recovery, block target": ["--head-split", "measured", *HELDOUT_REC, *BLOCK,
                                                                 *M1],
        "FFN only (no heads)": ["--head-split", "ffn-only", *M1],
        # the best peer (docs/compare.md) on the same texts: does a calibration text help ours more than it?
        "wanda-sp": [*WANDA_SP, *M1],
        "wanda-sp, coqa": [*WANDA_SP, "--calibration", "coqa", *M1],
        "wanda-sp, coqa, 128 samples": [*WANDA_SP, "--calibration", "coqa", "--nsamples", "128", *M1],
        "wanda-sp, lambada+coqa": [*WANDA_SP, "--calibration", "lambada+coqa", *M1],
        "wanda-sp, lambada+coqa, 128 samples": [*WANDA_SP, "--calibration", "lambada+coqa", "--nsamples", "128", *M1],
        "wanda-sp, lambada+coqa, 512 samples, seqlen 256": [*WANDA_SP, "--calibration", "lambada+coqa", "--nsamples",
                                                            "512", "--seqlen", "256", *M1],
    },
}
MODELS = {"smollm2": [], "gemma3": ["--sparsity-basis", "blocks"]}


Runner = Callable[[list[str]], None]


def child_process(argv: list[str]) -> None:
    """Run ``daprune ARGV`` in its own process (each row's time and memory measured alone)."""
    subprocess.run([sys.executable, "-m", "daprune.cli", *argv], check=True, stdout=subprocess.DEVNULL)


def run_prune(args: list[str], keep: Path | None = None, runner: Runner = child_process) -> tuple[dict, float]:
    """``daprune prune --out OUT ARGS``: its report.json and wall seconds. ``keep`` is a folder for the pruned model
    (e.g. for a zero-shot run later), else it is written to a temporary folder and deleted."""
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        out = keep if keep is not None else Path(tmp) / "pruned"
        t0 = time.perf_counter()
        runner(["prune", "--out", str(out), *args])
        wall = time.perf_counter() - t0
        return json.loads((out / "report.json").read_text()), wall


def run_row(model_args: list[str], extra: list[str], windows: int, corpora: str, keep: Path | None = None) -> dict:
    """One row's ``daprune prune`` (:func:`run_prune`)."""
    args = ["--sparsity", "0.2", "--eval", corpora, "--max-windows", str(windows), "--quiet", *model_args, *extra]
    report, wall = run_prune(args, keep)
    shapes = report["shapes"]["layers"]
    return {"command": " ".join(["daprune", "prune", "--out", "OUT", *args]), "wall_s": wall,
            "prune_s": report["timings"]["total_s"], "ppl": report["eval"]["ppl"],
            "params_after": report["params"]["after"], "achieved_sparsity": report["params"]["achieved_sparsity"],
            "achieved_block_sparsity": report["params"]["achieved_block_sparsity"],
            "threads": os.environ.get("OMP_NUM_THREADS", "default"), "uniform": report["shapes"]["uniform"],
            "layout": report.get("layout"),
            "widths": sorted({s.get("intermediate_size") for s in shapes}),
            "heads": sorted({s.get("num_attention_heads") for s in shapes})}


def run_dense(model_args: list[str], windows: int, corpora: str) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "dense.json"
        model = [a for i, a in enumerate(model_args) if i and model_args[i - 1] == "--model"]
        cmd = ["daprune", "eval", *(["--model", model[0]] if model else []), "--ppl", corpora,
               "--max-windows", str(windows), "--json", str(path), "--quiet"]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        return {"command": " ".join(cmd[:-3]), "ppl": json.loads(path.read_text())["ppl"]}


def heldout_mean(ppl: dict, corpora: list[str]) -> float:
    """Geometric mean perplexity over the held-out corpora (the calibration suite's tuning signal: each
    calibration text is in-domain for one of them)."""
    held = [ppl[c] for c in corpora if c.endswith("-heldout")]
    return math.exp(sum(map(math.log, held)) / len(held))


def table(data: dict) -> str:
    corpora = data.get("corpora", CORPORA).split(",")
    mean = sum(c.endswith("-heldout") for c in corpora) > 1
    labels = [LABELS.get(c, c) for c in corpora] + (["held-out geo. mean"] if mean else [])
    dense = data["rows"].get("dense", {}).get("ppl", {})

    def cells(p: dict) -> str:
        values = [p[c] for c in corpora] + ([heldout_mean(p, corpora)] if mean else [])
        return " | ".join(f"{v:.2f}" for v in values)

    lines = ["| setting | uniform config | FFN widths | heads | removed | " + " | ".join(labels) + " | prune s |",
             "|---|---|---|---|---|" + "---|" * len(labels) + "---|"]
    if dense:
        lines.append(f"| dense | - | - | - | - | {cells(dense)} | - |")
    for name, row in data["rows"].items():
        if name == "dense":
            continue
        widths = ", ".join(str(w) for w in row["widths"][:4]) + (" ..." if len(row["widths"]) > 4 else "")
        removed = row["achieved_block_sparsity"] if data["basis"] == "blocks" else row["achieved_sparsity"]
        lines.append(f"| {name} | {'yes' if row['uniform'] else 'no'} | {widths} | "
                     f"{', '.join(str(h) for h in row['heads'])} | {removed:.1%} | {cells(row['ppl'])} | "
                     f"{row['prune_s']:.0f} |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", choices=sorted(MODELS))
    ap.add_argument("--model", default=None, help="model path (gemma3: the assembled GGUF)")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--suite", choices=sorted(SUITES), default="layout")
    ap.add_argument("--rows", default=None, help="subset of the suite's rows, separated by ';'")
    ap.add_argument("--json", default=None, help="default docs/<suite>_<which>.json")
    ap.add_argument("--table-only", action="store_true")
    ap.add_argument("--keep-models", default=None, metavar="DIR",
                    help="keep each row's pruned model under DIR/<row name> instead of deleting it")
    args = ap.parse_args()
    rows = SUITES[args.suite]
    wanted = None if args.rows is None else [r.strip() for r in args.rows.split(";") if r.strip()]
    unknown = sorted(set(wanted or ()) - set(rows))
    if unknown:
        raise SystemExit(f"unknown row(s) {unknown} in suite {args.suite}; choose from {list(rows)}")
    path = Path(args.json or f"docs/{args.suite}_{args.which}.json")
    data = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    corpora = SUITE_CORPORA.get(args.suite, CORPORA)
    data.update({"model": args.model or "embedded SmolLM2-135M-Instruct", "windows": args.windows,
                 "corpora": corpora,
                 "basis": "blocks" if args.which == "gemma3" else "total", "sparsity": 0.2,
                 "threads": os.environ.get("OMP_NUM_THREADS", "default")})
    if not args.table_only:
        model_args = (["--model", args.model] if args.model else []) + MODELS[args.which]
        todo = ["dense"] + [r for r in rows if wanted is None or r in wanted]
        for name in todo:
            if name in data["rows"]:
                continue
            print(f"[{name}] ...", file=sys.stderr, flush=True)
            keep = Path(args.keep_models) / re.sub(r"[^A-Za-z0-9+.-]+", "_", name) if args.keep_models else None
            data["rows"][name] = run_dense(model_args, args.windows, corpora) if name == "dense" else \
                run_row(model_args, rows[name], args.windows, corpora, keep)
            tmp = path.with_name(f".{path.name}.tmp")
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            os.replace(tmp, path)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
