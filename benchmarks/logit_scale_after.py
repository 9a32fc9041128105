"""``--logit-scale fit`` on finished prunes: the scale the pipeline would have fitted, then the same evaluation.

The scale is fitted after the last block from the two last-layer streams on calibration rows (daprune.logit_scale),
and nothing before it depends on it. So a finished prune folder plus its own calibration rows give the same scale
without pruning again: this script rebuilds the rows from the folder's report (its seed, text and cached generated
rows; refused unless their digest equals the report's ``calibration.ids_sha256``), runs the dense and the pruned
model over the rows the pipeline reads (the first LOGIT_SCALE_NSAMPLES fit rows and the held-out rows), fits and
judges the scale with the pipeline's own function, writes it into the final norm and evaluates the same windows as
the prune's report. Rows go to a seed JSON in ``benchmarks/seed_spread.py``'s format, so that script's
``--table-only`` prints the spread with the mean's standard error.

    export DAPRUNE_DATA_DIR=/work/shared/data
    python benchmarks/logit_scale_after.py runs/q512-seeds/seed-0 runs/q512-seeds/seed-1 \
        --json docs/seeds_quality512_logitscale_smollm2.json --dense-from docs/seeds_quality_smollm2.json
    python benchmarks/seed_spread.py --json docs/seeds_quality512_logitscale_smollm2.json --table-only

Evaluation is on test text (WikiText-2, PTB) only to report: the scale is chosen on calibration rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch
from seed_spread import dense_from, row_from_report, table

from daprune.atomic import atomic_write_json


def calibration_rows(report: dict, model, tokenizer, source, data_dir: str | None, cache: str | None
                     ) -> torch.Tensor:
    """Every row the prune read, rebuilt as the pipeline built them, checked against the report's digest."""
    from daprune.api import _Run
    from daprune.checkpoint import ids_digest
    from daprune.config import PruneConfig
    from daprune.models.adapter import get_adapter
    from daprune.stores import ResidentStore

    known = {f.name for f in dataclasses.fields(PruneConfig)}
    cfg = PruneConfig(**{k: v for k, v in report["settings"].items() if k in known})
    run = _Run(cfg, torch.device("cpu"), source, None, None, "device", None, False, data_dir, cache)
    run.model, run.tokenizer = model, tokenizer
    run.adapter = get_adapter(model)
    run.store = ResidentStore(run.adapter)
    ids = run.calibration()
    want = report["calibration"].get("ids_sha256")
    if want is None or ids_digest(ids) != want:
        raise SystemExit(f"the rebuilt calibration rows differ from the prune's (digest {ids_digest(ids)} against "
                         f"{want}): another seed, text or generated cache")
    return ids


def last_layer_states(model, ids: torch.Tensor, batch_size: int) -> torch.Tensor:
    """The last decoder layer's output on ``ids``, as the pipeline's stream holds it: the final norm's input, read by
    a hook that ends each forward there (the LM head's logits are not needed)."""
    from torch import nn

    from daprune.hooks import capture
    from daprune.models.adapter import get_adapter

    norm = get_adapter(model).final_norm()
    first = norm[0] if isinstance(norm, nn.Sequential) else norm  # OPT's norm-then-projection: its norm
    if first is None:
        raise SystemExit("this model has no final norm to read the last layer's output from")
    got: list[torch.Tensor] = []
    with torch.no_grad():
        for s in range(0, ids.shape[0], batch_size):
            with capture({"norm": first}, stop=True) as seen:
                model(ids[s : s + batch_size])
            got.append(seen["norm"][0])
    return torch.cat(got)


def fit_after(folder: Path, report: dict, dense, tokenizer, source, data_dir: str | None, cache: str | None):
    """The pruned model of ``folder`` (whose report.json is ``report``) with the scale the pipeline would have fitted
    written in, and the report entry the pipeline would have written (daprune.logit_scale.fit_logit_scale on the
    same rows)."""
    from daprune.loader import load_pruned
    from daprune.logit_scale import LOGIT_SCALE_NSAMPLES, apply_tensors, fit_logit_scale
    from daprune.models.adapter import get_adapter

    settings = report["settings"]
    ids = calibration_rows(report, dense, tokenizer, source, data_dir, cache)
    held = settings["heldout_nsamples"]
    n_fit = ids.shape[0] - held
    rows = torch.cat([ids[: min(n_fit, LOGIT_SCALE_NSAMPLES)], ids[n_fit:]])
    pruned, _ = load_pruned(folder, dtype=settings["dtype"])
    bs = settings["batch_size"]
    xp, xd = last_layer_states(pruned, rows, bs), last_layer_states(dense, rows, bs)
    entry, tensors = fit_logit_scale(get_adapter(pruned), xp, xd, rows.shape[0] - held, bs)
    apply_tensors(pruned, tensors)
    return pruned, entry


def rescale(folder: Path, report: dict, dense, tokenizer, source, corpora: list[str], windows: int,
            data_dir: str | None, cache: str | None) -> dict:
    """One prune folder as a seed row: its perplexities with the scale, and without it (from its report)."""
    from daprune.evaluation.perplexity import evaluate

    before = row_from_report(report, corpora, windows, str(folder), None)
    t0 = time.perf_counter()
    pruned, entry = fit_after(folder, report, dense, tokenizer, source, data_dir, cache)
    fit_s = time.perf_counter() - t0
    got = evaluate(pruned, tokenizer, ppl=",".join(corpora), data_dir=data_dir, max_windows=windows, progress=False)
    report = {**report, "eval": got, "logit_scale": entry}
    report["timings"] = {**report["timings"], "total_s": report["timings"]["total_s"] + fit_s}
    row = row_from_report(report, corpora, windows, f"{folder} + logit scale {entry['scale']:g}", None)
    return {**row, "logit_scale": entry, "fit_s": fit_s, "ppl_without": before["ppl"]}


def main(argv: list[str] | None = None) -> int:
    import os

    from seed_spread import CORPORA

    from daprune.models.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="finished prune folders (report.json with its eval)")
    ap.add_argument("--json", required=True, type=Path, help="seed JSON; rewritten after each folder, done ones kept")
    ap.add_argument("--windows", type=int, default=256)
    ap.add_argument("--corpora", default=CORPORA)
    ap.add_argument("--dense-from", type=Path, default=None, metavar="JSON", help="the dense row of a seed JSON")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpora = args.corpora.split(",")
    data_dir, cache = os.environ.get("DAPRUNE_DATA_DIR"), os.environ.get("DAPRUNE_CACHE")
    reports = {f: json.loads((f / "report.json").read_text()) for f in args.folders}
    models = {r["settings"]["model"] for r in reports.values()}
    if len(models) != 1:
        raise SystemExit(f"the folders pruned different models: {sorted(map(str, models))}")
    settings = next(iter(reports.values()))["settings"]
    data = json.loads(args.json.read_text()) if args.json.is_file() else {
        "command": "benchmarks/logit_scale_after.py on prunes of: " + json.dumps(settings, sort_keys=True),
        "corpora": ",".join(corpora), "windows": args.windows, "settings": {**settings, "logit_scale": "fit"},
        "rows": {}}
    if args.dense_from is not None and "dense" not in data:
        data["dense"] = dense_from(args.dense_from, settings, corpora, args.windows)
    dense, tokenizer, source = load_model(settings["model"], dtype=settings["dtype"], cache=cache)
    dense.eval()
    for folder, report in reports.items():
        seed = str(report["settings"]["seed"])
        if seed in data["rows"]:
            print(f"seed {seed}: in {args.json} already", file=sys.stderr)
            continue
        print(f"seed {seed}: {folder}", file=sys.stderr, flush=True)
        data["rows"][seed] = rescale(folder, report, dense, tokenizer, source, corpora, args.windows, data_dir,
                                     cache)
        atomic_write_json(args.json, data)
        print(table(data), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
