"""Pool the sensitivity curves of several finished prunes into one allocation, for ``--allocation-from``.

Session 29 asked whether the spread between seeds of ``--preset quality`` (WikiText-2 89.21-93.98) comes from the
allocation, which the sensitivity pass measures on only 8 rows and which moves from seed to seed, or from the rows the
statistics and re-fits read. This script averages each block's KL over the reports' curves (all measured at the same
sizes: the same model, sparsity and size grid), spends the budget on the pooled curves exactly as the pipeline does
(:func:`daprune.allocation.allocate`), and writes a report.json holding the first report's settings and the pooled
allocation. A prune given it with ``--allocation-from`` then differs from its own-seed run only in the allocation
(docs/quality.md, "Where the spread between seeds comes from").

    python benchmarks/pooled_allocation.py runs/s28/quality-seeds/seed-{4,5,6} --out runs/s29/avg456/report.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from daprune.allocation import Curve, allocate
from daprune.allocation_reuse import report_path
from daprune.atomic import atomic_write_json


def pooled_curves(reports: list[dict]) -> list[Curve]:
    """Each block's mean KL over ``reports`` at each measured size; the sizes must agree."""
    first = reports[0]["allocation"]["curves"]
    curves = []
    for block, c in first.items():
        kls = []
        for r in reports:
            other = r["allocation"]["curves"].get(block)
            if other is None or other["params"] != c["params"]:
                raise SystemExit(f"block {block}: the reports measured other sizes; pool only runs of one model, "
                                 "sparsity and --sensitivity-sizes")
            kls.append(other["kl"])
        curves.append(Curve(int(block), list(c["params"]), [sum(k) / len(k) for k in zip(*kls, strict=True)]))
    return curves


def block_sizes(reports: list[dict], blocks: list[int]) -> dict[int, float]:
    """Each block's parameter count, from a report that pruned it (target / fraction)."""
    sizes: dict[int, float] = {}
    for r in reports:
        a = r["allocation"]
        for b in blocks:
            t, f = float(a["targets"][str(b)]), float(a["fractions"][str(b)])
            if f > 0:
                sizes.setdefault(b, t / f)
    return sizes


def pooled_report(reports: list[dict], sources: list[str]) -> dict:
    """The first report with its allocation replaced by the one spent on the pooled curves of all ``reports``."""
    budgets = {round(float(r["allocation"]["budget"])) for r in reports}
    if len(budgets) != 1:
        raise SystemExit(f"the reports spent other budgets ({sorted(budgets)}): pool runs of one model and sparsity")
    curves = pooled_curves(reports)
    targets = allocate(curves, float(reports[0]["allocation"]["budget"]))
    sizes = block_sizes(reports, [c.block for c in curves])
    if len(set(round(s) for s in sizes.values())) == 1:  # blocks of one shape: a dense-in-every-report block too
        sizes = {c.block: next(iter(sizes.values())) for c in curves}
    return {**reports[0], "allocation": {
        **reports[0]["allocation"],
        "pooled_from": sources,
        "nsamples": sum(int(r["allocation"]["nsamples"]) for r in reports),
        "curves": {str(c.block): {"params": c.params, "kl": c.kl} for c in curves},
        "targets": {str(b): t for b, t in targets.items()},
        "fractions": {str(b): (t / sizes[b] if b in sizes else None) for b, t in targets.items()},
    }}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("reports", nargs="+", help="finished --schedule sensitivity prunes (folders or report.json)")
    ap.add_argument("--out", required=True, help="report.json to write (its folder is created)")
    args = ap.parse_args()
    report = pooled_report([json.loads(report_path(s).read_text()) for s in args.reports],
                           [str(report_path(s)) for s in args.reports])
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, report)
    alloc = report["allocation"]
    shown = " ".join(f"{alloc['fractions'][b] or 0:.2f}" for b in alloc["curves"])
    print(f"pooled {len(args.reports)} reports ({alloc['nsamples']} KL rows); fractions per block: {shown}")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
