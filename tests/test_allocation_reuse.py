"""--allocation-from: a run given a finished run's allocation prunes with exactly those per-block targets, measures
nothing, and refuses a report made for another problem before any work."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import CharTokenizer, tiny_model

from daprune.api import prune
from daprune.config import PruneConfig
from daprune.errors import ConfigError
from daprune.report import summary

KW = dict(tokenizer=CharTokenizer(), calibration="random", nsamples=16, seqlen=32, batch_size=4, progress=False,
          sparsity=0.3, schedule="sensitivity")


@pytest.fixture
def measured(tmp_path, one_thread):
    """A measured-allocation prune written to a folder (its report holds the allocation)."""
    out = tmp_path / "measured"
    result = prune(model=tiny_model(), out=str(out), sensitivity_nsamples=2, **KW)
    return out, result


def _no_measuring(*_a, **_k):
    raise AssertionError("the allocation was measured although it was given")


def test_same_settings_and_the_reused_allocation_give_the_same_model(measured, tmp_path, monkeypatch):
    out, first = measured
    monkeypatch.setattr("daprune.allocation.sensitivity_targets", _no_measuring)
    again = prune(model=tiny_model(), allocation_from=str(out), **KW)
    a, b = first.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    alloc = again.report["allocation"]
    assert alloc["targets"] == first.report["allocation"]["targets"]
    assert alloc["reused_from"] == str(out / "report.json") and alloc["seconds"] == 0.0
    assert again.report["settings"]["allocation_from"] == str(out)
    assert f"allocation     sensitivity (reused from {out / 'report.json'})" in summary(again.report)
    # the sensitivity setting the first run measured with may be stated when it is the report's
    prune(model=tiny_model(), allocation_from=str(out / "report.json"), sensitivity_nsamples=2, **KW)


def test_the_targets_in_the_report_are_what_gets_pruned(measured, tmp_path, monkeypatch):
    """Edit the report: move budget from one pruned block to a block the measurement left whole. The new run must
    prune that block and spare the other by those amounts (read from its layers, not its allocation entry)."""
    out, first = measured
    report = json.loads((out / "report.json").read_text())
    targets = {k: float(v) for k, v in report["allocation"]["targets"].items()}
    donor = max(targets, key=targets.get)
    whole = [k for k, v in targets.items() if v == 0]
    taker = whole[0] if whole else min(targets, key=targets.get)
    moved = targets[donor] / 2
    targets[donor] -= moved
    targets[taker] += moved
    report["allocation"]["targets"] = targets
    edited = tmp_path / "edited.json"
    edited.write_text(json.dumps(report))
    monkeypatch.setattr("daprune.allocation.sensitivity_targets", _no_measuring)
    run = prune(model=tiny_model(), allocation_from=str(edited), **KW)

    def lost(rep: dict, i: str) -> int:  # parameters a block lost, as its layer row states its plan
        row = next(r for r in rep["layers"] if str(r["index"]) == i)
        return (row.get("plan") or {}).get("params", 0)

    assert run.report["allocation"]["targets"] == targets
    assert lost(run.report, taker) > lost(first.report, taker)  # the block that gained budget loses more now
    assert lost(run.report, donor) < lost(first.report, donor)


@pytest.mark.parametrize(("change", "match"), [
    ({"sparsity": 0.2}, "sparsity 0.3 there, 0.2 here"),
    ({"layers": "1:-1"}, "layers"),
    ({"schedule": "owl"}, "schedule"),
    ({"sensitivity_nsamples": 4}, "measured otherwise"),
])
def test_a_report_for_another_problem_is_refused_before_any_work(measured, monkeypatch, change, match):
    out, _ = measured

    def no_work(*_a, **_k):
        raise AssertionError("calibration started before the report was checked")

    monkeypatch.setattr("daprune.data.calibration.calibration_tokens", no_work)
    with pytest.raises(ConfigError, match=match):
        prune(model=tiny_model(), allocation_from=str(out), **{**KW, **change})


def test_missing_or_empty_reports_and_schedules_that_allocate_nothing(tmp_path):
    with pytest.raises(ConfigError, match="no report.json"):
        prune(model=tiny_model(), allocation_from=str(tmp_path / "nowhere"), **KW)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"settings": {}, "allocation": None}))
    with pytest.raises(ConfigError, match="records no per-block allocation"):
        prune(model=tiny_model(), allocation_from=str(plain), **KW)
    with pytest.raises(ConfigError, match="give the same --schedule"):
        PruneConfig(allocation_from=str(plain)).validate()


def test_a_model_of_another_size_is_refused_at_the_budget(measured, tmp_path):
    """Same settings, another model (wider FFN): the report's targets would remove another amount."""
    out, _ = measured
    with pytest.raises(ConfigError, match="budget"):
        prune(model=tiny_model(inter=128), allocation_from=str(out), **KW)
