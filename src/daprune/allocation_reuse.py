"""Reusing a finished run's per-block allocation (``--allocation-from``) instead of measuring it again.

The sensitivity pass is the costliest part of a measured-allocation prune (336 of 935 s for SmolLM2's
``--preset quality`` on two cores, session 28), and it does not depend on anything after it: a run that changes only
the re-fit, the held-out choice or the written precision spends it again for the same shares. A run given another
report's allocation takes that report's per-block parameter targets as they are. The report must be for the same
model, size, sparsity basis, blocks and schedule; that is checked twice: from the report's settings before any work,
and against the budget and the blocks the pipeline computes before the first block is pruned.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from daprune.errors import ConfigError

# the settings that decide the budget and the candidate blocks: a report that differs in any of them allocated
# another problem
_SAME = ("model", "sparsity", "sparsity_basis", "schedule", "layout")
# the settings that shape how an allocation is measured: this run may leave them unset, or state the report's
_MEASUREMENT = ("sensitivity_nsamples", "sensitivity_copy_rows", "sensitivity_sizes", "sensitivity_refit",
                "allocation_search", "search_nsamples", "owl_lambda", "owl_threshold")


def report_path(source: str) -> Path:
    """``source`` as the report file: a report.json, or a pruned folder holding one."""
    p = Path(source)
    return p / "report.json" if p.is_dir() else p


def read_allocation(source: str, settings: dict[str, Any], layers: str) -> dict:
    """The allocation entry of the report at ``source``, after checking it was made for this run's problem:
    ``settings`` (this run's PruneConfig as a dict) and ``layers`` (its block range as given or defaulted)."""
    path = report_path(source)
    try:
        report = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"--allocation-from {source}: no report.json there") from None
    except (OSError, ValueError) as exc:
        raise ConfigError(f"--allocation-from {source}: cannot read {path} ({exc})") from None
    entry = report.get("allocation") if isinstance(report, dict) else None
    if not isinstance(entry, dict) or not isinstance(entry.get("targets"), dict) or "budget" not in entry:
        raise ConfigError(f"--allocation-from {source}: {path} records no per-block allocation (it was not a "
                          "--schedule sensitivity|owl run)")
    theirs = report.get("settings", {})
    differ = [k for k in _SAME if theirs.get(k) != settings.get(k)]
    if _layers_of(theirs) != layers:
        differ.append("layers")
    stated = [k for k in _MEASUREMENT if settings.get(k) not in (None, False) and settings.get(k) != theirs.get(k)]
    if stated:
        shown = ", ".join(f"{k} {theirs.get(k)!r} there, {settings.get(k)!r} here" for k in stated)
        raise ConfigError(f"--allocation-from {source}: its allocation was measured otherwise ({shown}); drop those "
                          "settings (the allocation is reused, not measured) or measure it")
    if differ:
        shown = ", ".join(f"{k} {theirs.get(k)!r} there, {layers if k == 'layers' else settings.get(k)!r} here"
                          for k in differ)
        raise ConfigError(f"--allocation-from {source}: that run allocated another budget ({shown}); give it the "
                          "same settings or measure the allocation")
    return {**entry, "reused_from": str(path)}


def _layers_of(settings: dict) -> str:
    """A report's block range as its run resolved it (its --layers, or the schedule's default)."""
    from daprune.config import PruneConfig

    return PruneConfig(layers=settings.get("layers"), schedule=settings.get("schedule", "uniform")).layers_spec()


def check_against(entry: dict, blocks: range, budget: float) -> dict:
    """The reused entry once the pipeline knows this run's blocks and budget (parameters to remove): they must be
    the report's, else the targets would remove another amount or touch other blocks."""
    mine = {str(i) for i in blocks}
    if set(entry["targets"]) != mine:
        raise ConfigError(f"--allocation-from {entry['reused_from']}: its allocation covers blocks "
                          f"{sorted(int(i) for i in entry['targets'])}, this run prunes {sorted(blocks)}")
    total = sum(float(t) for t in entry["targets"].values())
    if not math.isclose(total, budget, rel_tol=1e-6) or not math.isclose(float(entry["budget"]), budget, rel_tol=1e-6):
        raise ConfigError(f"--allocation-from {entry['reused_from']}: its targets remove {total:,.0f} parameters, "
                          f"this run's budget is {budget:,.0f} (another model or size)")
    return {**entry, "source_seconds": entry.get("seconds"), "seconds": 0.0}
