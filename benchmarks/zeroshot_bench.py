"""Zero-shot accuracy of a model on the seven standard tasks, or the tuning tasks (lm-eval, offline data).

Usage::

    python benchmarks/zeroshot_bench.py [--model DIR] [--limit N | --stride K] [--batch-size B] [--dtype bf16|fp32]
                                        [--tasks piqa,arc_easy] [--threads T] [--json FILE] [--one-by-one]
    python benchmarks/zeroshot_bench.py --compare-dtypes --tasks hellaswag,arc_easy --limit 300
    python benchmarks/zeroshot_bench.py --compare-scoring --tasks hellaswag,arc_easy,piqa --limit 200
    python benchmarks/zeroshot_bench.py --side-by-side Dense=docs/a.json "Ours 20%=docs/b.json"

The default model is the embedded SmolLM2-135M-Instruct (de-quantized from its GGUF). ``--compare-dtypes``
scores the same documents in fp32 and bf16 and reports how often the chosen answer changes, to decide
whether bf16 (much faster on CPU) stays within noise. ``--compare-scoring`` does the same for scoring every
answer as its own sequence against the default, each question run once for all its answers (shared contexts),
to time what that saves and show the scores do not move. ``--side-by-side`` prints earlier results (JSONs of this
script) as one markdown table, each task's reported metric per model and the difference from the first; it
refuses results over different document counts, which would not be comparable.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from daprune.atomic import atomic_write_bytes
from daprune.evaluation.zeroshot import SEVEN_TASKS, TASKS_HELP, evaluate_zeroshot, parse_tasks

DTYPES = {"fp32": "float32", "bf16": "bfloat16"}


def load(model_dir: str | None, dtype: str) -> tuple[Any, Any]:
    """Load ``(model, tokenizer)`` in ``dtype`` through the project's loader (embedded default if None)."""
    from daprune.models.loading import load_model

    model, tokenizer, _ = load_model(model_dir, dtype=DTYPES[dtype])
    return model.eval(), tokenizer


def run(args: argparse.Namespace, dtype: str, *, log_samples: bool = False, one_by_one: bool | None = None
        ) -> dict[str, Any]:
    """Evaluate once and attach the settings needed to reproduce the numbers (``one_by_one`` None: as
    ``--one-by-one`` says)."""
    one_by_one = args.one_by_one if one_by_one is None else one_by_one
    model, tokenizer = load(args.model, dtype)
    start = time.perf_counter()
    result = evaluate_zeroshot(
        model,
        tokenizer,
        args.tasks,
        limit=args.limit,
        stride=args.stride,
        batch_size=args.batch_size,
        progress=not args.quiet,
        log_samples=log_samples,
        request_cache=args.request_cache,
        trim_logits=not args.all_logits,
        share_contexts=not one_by_one,
    )
    result["wall_s"] = time.perf_counter() - start
    result["settings"] = {
        "model": args.model or "embedded SmolLM2-135M-Instruct (GGUF Q4_1, de-quantized)",
        "dtype": dtype,
        "batch_size": args.batch_size,
        "threads": torch.get_num_threads(),
        "request_cache": args.request_cache,  # wall_s covers only requests not already cached
        "trim_logits": not args.all_logits,
        "share_contexts": not one_by_one,
        "torch": torch.__version__,
        "command": " ".join(shlex.quote(a) for a in sys.argv),
    }
    # a daprune output folder: keep how it was pruned next to its scores
    if args.model and (report := Path(args.model, "report.json")).is_file():
        result["prune_settings"] = json.loads(report.read_text()).get("settings")
    return result


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def print_table(result: dict[str, Any]) -> None:
    """Task, the metric that enters the mean, its value and stderr, acc/acc_norm and doc count."""
    print(f"{'task':<14} {'metric':<9} {'value':>7} {'stderr':>7} {'acc':>7} {'acc_norm':>8} {'n':>6}")
    for task, row in result["tasks"].items():
        metric = result["mean_metrics"][task]
        stderr = row.get(f"{metric}_stderr")
        print(
            f"{task:<14} {metric:<9} {_fmt(row[metric]):>7} {_fmt(stderr):>7} {_fmt(row['acc']):>7} "
            f"{_fmt(row['acc_norm']):>8} {row['n']:>6}"
        )
    settings = result["settings"]
    print(f"{'mean':<14} {'':<9} {result['mean']:.4f}")
    print(
        f"wall time {result['wall_s']:.0f} s, dtype {settings['dtype']}, batch {settings['batch_size']}, "
        f"threads {settings['threads']}, limit {result['limit']}, stride {result.get('stride')}, "
        f"offline {result['offline']}"
    )


def side_by_side(results: dict[str, dict[str, Any]]) -> str:
    """Markdown: one row per task (the metric that enters the mean, in points), one column per labelled result,
    then each later result's difference from the first; the first result's tasks, all of which every result must
    have, scored on the same number of documents."""
    if len(results) < 2:
        raise ValueError("side by side needs at least two results")
    (first_label, first), *rest = results.items()
    for label, res in rest:
        for key in ("limit", "stride"):
            if res.get(key) != first.get(key):
                raise ValueError(f"{label!r} scored {key}={res.get(key)}, {first_label!r} {key}={first.get(key)}: "
                                 "not the same documents, not comparable")
        missing = set(first["tasks"]) - set(res["tasks"])
        if missing:
            raise ValueError(f"{label!r} has no result for {sorted(missing)}")
        for task in first["tasks"]:
            if res["tasks"][task]["n"] != first["tasks"][task]["n"]:
                raise ValueError(f"{label!r} scored {res['tasks'][task]['n']} {task} docs, {first_label!r} "
                                 f"{first['tasks'][task]['n']}")
    labels = list(results)
    head = ["task", "metric", *labels, *[f"{lab} - {first_label}" for lab in labels[1:]], "n"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for task in first["tasks"]:
        metric = first["mean_metrics"][task]
        values = [100 * r["tasks"][task][metric] for r in results.values()]
        cells = [task, metric, *[f"{v:.1f}" for v in values], *[f"{v - values[0]:+.1f}" for v in values[1:]],
                 str(first["tasks"][task]["n"])]
        lines.append("| " + " | ".join(cells) + " |")
    means = [100 * r["mean"] for r in results.values()]
    lines.append("| **mean** | | " + " | ".join(f"**{m:.2f}**" for m in means) + " | "
                 + " | ".join(f"**{m - means[0]:+.2f}**" for m in means[1:]) + " | |")
    return "\n".join(lines)


def _per_doc(samples: list[dict[str, Any]], metric: str) -> dict[int, tuple[list[float], float]]:
    """doc_id -> (log-likelihood of each choice, 0/1 correctness under ``metric``)."""
    return {s["doc_id"]: ([float(r[0]) for r in s["filtered_resps"]], float(s[metric])) for s in samples}


def compare_dtypes(args: argparse.Namespace) -> dict[str, Any]:
    """Score the same documents in fp32 and bf16; report metric deltas and per-doc flips."""
    return compare(args, {dtype: run(args, dtype, log_samples=True) for dtype in ("fp32", "bf16")})


def compare_scoring(args: argparse.Namespace) -> dict[str, Any]:
    """Score the same documents one answer per sequence and with shared contexts, in ``--dtype``."""
    return compare(args, {"one-by-one": run(args, args.dtype, log_samples=True, one_by_one=True),
                          "shared": run(args, args.dtype, log_samples=True, one_by_one=False)})


def compare(args: argparse.Namespace, runs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Two labelled runs over the same documents: each task's metric in both, per-doc flips, the largest
    change of any choice's log-likelihood, and the wall times (the first run is the reference)."""
    (ref_label, ref), (label, other) = runs.items()
    report: dict[str, Any] = {"tasks": {}, "wall_s": {k: r["wall_s"] for k, r in runs.items()},
                              "settings": {k: r["settings"] for k, r in runs.items()}}
    for task in args.tasks:
        metric = ref["mean_metrics"][task]
        a, b = (_per_doc(r["samples"][task], metric) for r in (ref, other))
        flipped = sum(a[i][1] != b[i][1] for i in a)
        max_dll = max(abs(x - y) for i in a for x, y in zip(a[i][0], b[i][0], strict=True))
        first, second = ref["tasks"][task], other["tasks"][task]
        report["tasks"][task] = {
            "metric": metric,
            ref_label: first[metric],
            label: second[metric],
            "stderr": first[f"{metric}_stderr"],
            "n": first["n"],
            "docs_flipped": flipped,
            "max_abs_dll": max_dll,
        }
        print(
            f"{task:<14} {metric:<9} {ref_label} {first[metric]:.4f}  {label} {second[metric]:.4f}  "
            f"stderr {first[f'{metric}_stderr']:.4f}  n {first['n']}  "
            f"docs flipped {flipped}/{len(a)}  max|dLL| {max_dll:.3g}"
        )
    print(", ".join(f"wall time {k} {w:.0f} s" for k, w in report["wall_s"].items()))
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="HF model folder (default: embedded SmolLM2)")
    parser.add_argument("--tasks", default=",".join(SEVEN_TASKS), help=f"{TASKS_HELP} (default: all)")
    parser.add_argument("--limit", type=int, default=None, help="first N documents of each task")
    parser.add_argument("--stride", type=int, default=None, metavar="K",
                        help="every K-th document of each task, spread over the whole set (not with --limit)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compare-dtypes", action="store_true", help="fp32 vs bf16 on the same documents")
    parser.add_argument("--compare-scoring", action="store_true",
                        help="one answer per sequence vs shared contexts, in --dtype, on the same documents")
    parser.add_argument("--json", default=None, help="write the result here")
    parser.add_argument("--request-cache", default=None, metavar="DIR",
                        help="lm-eval request cache per model: a stopped run continues where it was")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--side-by-side", nargs="+", metavar="LABEL=FILE", default=None,
                        help="print earlier results of this script as one markdown table (no evaluation)")
    parser.add_argument("--all-logits", action="store_true",
                        help="vocabulary logits at every position (with --one-by-one: plain HFLM), to time "
                             "the saving")
    parser.add_argument("--one-by-one", action="store_true",
                        help="score every answer as its own sequence, the question run once per answer "
                             "(to time what shared contexts save)")
    args = parser.parse_args(argv)
    try:
        args.tasks = parse_tasks(args.tasks)
    except ValueError as exc:
        parser.error(str(exc))
    if args.limit is not None and args.limit < 1:
        parser.error("--limit must be >= 1")
    if args.stride is not None and (args.stride < 1 or args.limit is not None):
        parser.error("--stride must be >= 1, and not given with --limit")
    if args.compare_dtypes and args.compare_scoring:
        parser.error("--compare-dtypes and --compare-scoring are two separate comparisons: pick one")
    if args.threads is not None:
        if args.threads < 1:
            parser.error("--threads must be >= 1")
        torch.set_num_threads(args.threads)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.side_by_side:
        pairs = [spec.partition("=") for spec in args.side_by_side]
        if any(not label or not sep or not path for label, sep, path in pairs):
            raise SystemExit("--side-by-side takes LABEL=FILE arguments")
        print(side_by_side({label: json.loads(Path(path).read_text()) for label, _, path in pairs}))
        return 0
    if args.compare_dtypes:
        out = compare_dtypes(args)
    elif args.compare_scoring:
        out = compare_scoring(args)
    else:
        out = run(args, args.dtype)
        print_table(out)
    if args.json:
        atomic_write_bytes(Path(args.json), (json.dumps(out, indent=2, default=str) + "\n").encode())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
