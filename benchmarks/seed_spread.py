"""How much one prune command's perplexities move with its seed: the same ``daprune prune`` settings run once per
seed, each evaluated on the same windows, then the spread (mean, standard deviation, the mean's standard error,
range) and the mean's ratio to dense.

The seed draws the calibration rows from their texts, samples the generated text, draws the sensitivity schedule's
rows and breaks ties, so two seeds of one command are two draws of the same method. On SmolLM2 at 20% two seeds of
the best real-text row differed by 1.3% on WikiText-2 and 10% on PTB (docs/quality.md, session 23): a choice
between settings that turns on less than that needs several seeds per setting, and this script is how to get them.

    export DAPRUNE_DATA_DIR=/work/shared/data
    python benchmarks/seed_spread.py --seeds 0,1,2 --json docs/seeds_quality_smollm2.json -- --preset quality
    python benchmarks/seed_spread.py --json docs/seeds_quality_smollm2.json --add runs/a runs/b -- --preset quality
    python benchmarks/seed_spread.py --json docs/seeds_quality_smollm2.json --table-only
    python benchmarks/seed_spread.py --seeds 0,1 --json FILE --dense-from docs/seeds_quality_smollm2.json -- ...

Everything after ``--`` is the prune command's settings; the script sets ``--out``, ``--seed``, ``--eval`` and
``--max-windows`` itself and refuses them there. ``--add DIR`` counts a finished prune folder (its report.json) as
the seed it ran with, after checking that it ran the same settings and was evaluated on the same windows, so runs
made earlier need not be repeated. ``--dense-from JSON`` takes the dense row of another seed JSON of the same model,
windows and corpora instead of evaluating the dense model again. Each seed runs in a child process; the JSON is
rewritten (atomically) after each one and seeds already in it are skipped, so a stopped run continues. Tune only on
the held-out columns: WikiText-2 and PTB are test data.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
from pathlib import Path

from settings_bench import LABELS, Runner, child_process, run_dense, run_prune

from daprune.atomic import atomic_write_json

CORPORA = "lambada-heldout,coqa-heldout,wiki-heldout,wikitext2,ptb"
# set by this script for every seed: the same flags among the prune settings would be overridden or clash
RESERVED = ("--out", "--seed", "--eval", "--max-windows", "--quiet", "--overwrite", "--resume")
# report.json settings that may differ between the seeds of one command: the seed itself, and the preset's name
# (its settings are compared one by one, so `--preset quality` and the same flags typed out are the same command)
FREE = ("seed", "preset")


def reserved_flags(prune_args: list[str]) -> list[str]:
    """The flags of ``prune_args`` this script sets itself, also as argparse abbreviations (``--see 3``)."""
    found = []
    for token in prune_args:
        name = token.split("=", 1)[0]
        if name.startswith("--") and len(name) > 2 and any(flag.startswith(name) for flag in RESERVED):
            found.append(name)
    return found


def expected_settings(prune_args: list[str]) -> dict:
    """The settings report.json records for ``prune_args`` (checked like a prune would check them: bad settings
    are refused here, before the first seed runs)."""
    from daprune.cli import parse_args, prune_config

    return prune_config(parse_args(["prune", "--out", "unused", *prune_args])).to_dict()


def differences(settings: dict, expected: dict) -> list[str]:
    """The settings (other than ``FREE``) in which a report differs from the command, as ``name: got != want``.

    A setting the report does not name at all is one added after it ran; that run behaved as the setting's default
    does (new settings keep the old behaviour by default), so it differs only where the command sets another value."""
    from daprune.config import PruneConfig

    default = PruneConfig().to_dict()
    keys = sorted((set(settings) | set(expected)) - set(FREE))
    return [f"{k}: {settings.get(k)!r} != {expected.get(k)!r}" for k in keys
            if settings.get(k, default.get(k)) != expected.get(k)]


def row_from_report(report: dict, corpora: list[str], windows: int, source: str, wall_s: float | None) -> dict:
    """One seed's row: its perplexities (refused unless every corpus was evaluated on ``windows`` windows)."""
    details = report.get("eval", {}).get("ppl_details", {})
    wrong = [c for c in corpora if details.get(c, {}).get("windows") != windows]
    if wrong:
        raise SystemExit(f"{source}: not evaluated on {windows} windows of {', '.join(wrong)} "
                         f"(prune with --eval {','.join(corpora)} --max-windows {windows})")
    return {"seed": report["settings"]["seed"], "source": source, "ppl": {c: details[c]["ppl"] for c in corpora},
            "prune_s": report["timings"]["total_s"], "wall_s": wall_s, "params_after": report["params"]["after"],
            "achieved_sparsity": report["params"]["achieved_sparsity"],
            "daprune_version": report.get("daprune_version")}


def read_run(folder: Path, expected: dict, corpora: list[str], windows: int) -> dict:
    """A finished prune folder as a row, refused unless it ran ``expected`` (up to the seed) on the same windows."""
    path = folder / "report.json"
    if not path.is_file():
        raise SystemExit(f"--add {folder}: no report.json there")
    report = json.loads(path.read_text())
    diff = differences(report["settings"], expected)
    if diff:
        raise SystemExit(f"--add {folder}: ran other settings than the command: " + "; ".join(diff))
    return row_from_report(report, corpora, windows, str(folder), None)


def dense_from(path: Path, expected: dict, corpora: list[str], windows: int) -> dict:
    """The dense row of another seed JSON, refused unless it evaluated the same model on the same windows of every
    corpus: the dense model does not depend on the prune settings, so evaluating it again for each command repeats
    minutes of work for the same numbers."""
    if not path.is_file():
        raise SystemExit(f"--dense-from {path}: no such file")
    other = json.loads(path.read_text())
    dense = other.get("dense")
    if dense is None:
        raise SystemExit(f"--dense-from {path}: it has no dense row (run with --no-dense?)")
    model = other.get("settings", {}).get("model")
    if model != expected.get("model"):
        raise SystemExit(f"--dense-from {path}: its model is {model!r}, this command's {expected.get('model')!r}")
    missing = [c for c in corpora if c not in dense["ppl"]]
    if other.get("windows") != windows or missing:
        raise SystemExit(f"--dense-from {path}: evaluated on {other.get('windows')} windows of "
                         f"{', '.join(dense['ppl'])}; this run wants {windows} windows of {', '.join(corpora)}")
    return {**dense, "ppl": {c: dense["ppl"][c] for c in corpora}, "from": str(path)}


def seed_args(prune_args: list[str], seed: int | str, corpora: list[str], windows: int) -> list[str]:
    """The prune settings of one seed: the command's, the seed, and the evaluation every seed shares."""
    return [*prune_args, "--seed", str(seed), "--eval", ",".join(corpora), "--max-windows", str(windows), "--quiet"]


def run_seed(prune_args: list[str], seed: int, corpora: list[str], windows: int, keep: Path | None = None,
             runner: Runner = child_process) -> dict:
    """Prune with ``seed`` and evaluate; the model goes to ``keep`` (if given) or a deleted temporary folder."""
    report, wall = run_prune(seed_args(prune_args, seed, corpora, windows), keep, runner)
    return row_from_report(report, corpora, windows, str(keep) if keep is not None else "run", wall)


def summarise(rows: list[dict], corpora: list[str], dense: dict | None) -> dict:
    """Per corpus: seeds, mean, sample standard deviation and the mean's standard error (None for one seed), min,
    max; with a dense row, the mean's ratio to dense. The standard error is what says whether a mean is below a
    goal with some confidence or only by a draw (89.86 against 90.14 with a standard error of 1.08 is not)."""
    out = {}
    for c in corpora:
        values = [r["ppl"][c] for r in rows]
        mean = statistics.fmean(values)
        sd = statistics.stdev(values) if len(values) > 1 else None
        out[c] = {"n": len(values), "mean": mean, "sd": sd,
                  "se": sd / math.sqrt(len(values)) if sd is not None else None,
                  "min": min(values), "max": max(values),
                  "ratio": mean / dense["ppl"][c] if dense else None}
    return out


def table(data: dict) -> str:
    """Markdown: dense, one row per seed, then mean ± sd, range and the mean's ratio to dense."""
    corpora = data["corpora"].split(",")
    rows = sorted(data["rows"].values(), key=lambda r: r["seed"])
    dense = data.get("dense")
    lines = ["| seed | " + " | ".join(LABELS.get(c, c) for c in corpora) + " | prune s | source |",
             "|---|" + "---|" * len(corpora) + "---|---|"]
    if dense:
        lines.append("| dense | " + " | ".join(f"{dense['ppl'][c]:.2f}" for c in corpora) + " | - | - |")
    for r in rows:
        lines.append(f"| {r['seed']} | " + " | ".join(f"{r['ppl'][c]:.2f}" for c in corpora)
                     + f" | {r['prune_s']:.0f} | {r['source']} |")
    if rows:
        s = summarise(rows, corpora, dense)

        def cell(c: str) -> str:
            return f"{s[c]['mean']:.2f}" + (f" ± {s[c]['sd']:.2f}" if s[c]["sd"] is not None else "")

        lines.append(f"| **mean of {len(rows)}** | " + " | ".join(cell(c) for c in corpora) + " | | |")
        if len(rows) > 1:
            lines.append("| standard error of the mean | " + " | ".join(f"{s[c]['se']:.2f}" for c in corpora)
                         + " | | |")
        lines.append("| range | " + " | ".join(f"{s[c]['min']:.2f} - {s[c]['max']:.2f}" for c in corpora) + " | | |")
        if dense:
            lines.append("| mean / dense | " + " | ".join(f"{s[c]['ratio']:.3f}x" for c in corpora) + " | | |")
    return "\n".join(lines)


def parse_seeds(text: str) -> list[int]:
    try:
        seeds = [int(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--seeds takes integers separated by commas, got {text!r}") from None
    if len(set(seeds)) != len(seeds):
        raise SystemExit(f"--seeds repeats a seed: {text!r}")
    return seeds


def main(argv: list[str] | None = None, runner: Runner = child_process) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cut = argv.index("--") if "--" in argv else len(argv)
    own, prune_args = argv[:cut], argv[cut + 1:]
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", default="", help="seeds to run, comma separated (those already in the JSON are kept)")
    ap.add_argument("--add", nargs="+", default=[], metavar="DIR",
                    help="finished prune folders of the same settings, counted as the seeds they ran with")
    ap.add_argument("--json", required=True, help="results; rewritten after each seed, a stopped run continues")
    ap.add_argument("--windows", type=int, default=256, help="evenly spaced 128-token windows per corpus")
    ap.add_argument("--corpora", default=CORPORA)
    ap.add_argument("--keep-models", default=None, metavar="DIR", help="keep each seed's model under DIR/seed-N")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense evaluation (no ratio to dense)")
    ap.add_argument("--dense-from", default=None, metavar="JSON",
                    help="take the dense row from another of this script's JSON files (same model, windows and "
                         "corpora) instead of evaluating it again")
    ap.add_argument("--table-only", action="store_true", help="print the table of the JSON and stop")
    args = ap.parse_args(own)
    path = Path(args.json)
    if args.table_only:
        print(table(json.loads(path.read_text())))
        return 0
    if not prune_args:
        raise SystemExit("give the prune settings after '--' (e.g. -- --preset quality)")
    clash = reserved_flags(prune_args)
    if clash:
        raise SystemExit(f"{', '.join(clash)} among the prune settings: this script sets "
                         f"{', '.join(RESERVED)} itself")
    if args.dense_from and args.no_dense:
        raise SystemExit("--dense-from and --no-dense: give one")
    seeds = parse_seeds(args.seeds)
    corpora = [c.strip() for c in args.corpora.split(",") if c.strip()]
    expected = expected_settings(prune_args)  # bad settings stop here, before any work
    borrowed = dense_from(Path(args.dense_from), expected, corpora, args.windows) if args.dense_from else None
    shared = {k: v for k, v in expected.items() if k not in FREE}
    data = json.loads(path.read_text()) if path.is_file() else {"rows": {}}
    if path.is_file():  # compared as --add compares a report: a setting newer than the JSON counts as its default
        diff = differences(data["settings"], expected) if "settings" in data else ["no settings recorded"]
        if diff or (data.get("windows"), data.get("corpora")) != (args.windows, ",".join(corpora)):
            raise SystemExit(f"{path} holds another command or other windows/corpora"
                             + (f" ({'; '.join(diff)})" if diff else "") + ": use another --json")
    added = [read_run(Path(d), expected, corpora, args.windows) for d in args.add]  # all checked before any run
    taken = {int(k) for k in data["rows"]}
    for row in added:
        if row["seed"] in taken:
            raise SystemExit(f"--add {row['source']}: seed {row['seed']} is already counted")
        taken.add(row["seed"])
    command = ["daprune", "prune", "--out", "OUT", *seed_args(prune_args, "SEED", corpora, args.windows)]
    data.update({"command": " ".join(command), "prune_args": prune_args, "settings": shared,
                 "windows": args.windows, "corpora": ",".join(corpora)})

    def save() -> None:
        rows = sorted(data["rows"].values(), key=lambda r: r["seed"])
        data["summary"] = summarise(rows, corpora, data.get("dense")) if rows else {}
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, data)

    for row in added:
        data["rows"][str(row["seed"])] = row
    if added:
        save()
    if borrowed is not None and data.get("dense") != borrowed:
        data["dense"] = borrowed
        save()
    if not args.no_dense and "dense" not in data:
        print("[dense] ...", file=sys.stderr, flush=True)
        model = expected.get("model")
        data["dense"] = run_dense(["--model", model] if model else [], args.windows, ",".join(corpora))
        save()
    todo = [s for s in seeds if s not in taken]
    for i, seed in enumerate(todo, 1):
        print(f"[seed {seed}] {i}/{len(todo)} ...", file=sys.stderr, flush=True)
        keep = Path(args.keep_models) / f"seed-{seed}" if args.keep_models else None
        row = run_seed(prune_args, seed, corpora, args.windows, keep, runner)
        data["rows"][str(seed)] = row
        save()
        print(f"[seed {seed}] done in {row['wall_s']:.0f} s: "
              + ", ".join(f"{c} {row['ppl'][c]:.2f}" for c in corpora), file=sys.stderr, flush=True)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
