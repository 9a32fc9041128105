"""benchmarks/seed_spread.py: one prune command over several seeds, resumable, and finished runs counted only when
they ran the same settings on the same windows."""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import pytest
from conftest import benchmark_module, tiny_model
from test_streaming import save_model

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def spread(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # it imports its sibling settings_bench, as a script run does
    return benchmark_module("seed_spread")


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    return save_model(tiny_model(layers=4), tmp_path_factory.mktemp("tiny") / "model")


def _args(folder: Path, data_dir: str, nsamples: int = 16) -> list[str]:
    return ["--model", str(folder), "--layers", "1:-1", "--sparsity", "0.1", "--calibration", "random",
            "--nsamples", str(nsamples), "--seqlen", "32", "--data-dir", data_dir]


def _cli(argv: list[str]) -> None:
    from daprune.cli import main

    assert main(argv) == 0


def _plain_prune(args: list[str], out: Path, seed: int, windows: int = 2) -> float:
    """What a user would have run by hand: the CLI with a seed and an evaluation; its WikiText-2 perplexity."""
    _cli(["prune", *args, "--out", str(out), "--seed", str(seed), "--eval", "wikitext2", "--max-windows",
          str(windows), "--quiet"])
    return json.loads((out / "report.json").read_text())["eval"]["ppl"]["wikitext2"]


def test_summary_is_the_sample_mean_and_deviation(spread):
    rows = [{"ppl": {"w": 90.0}}, {"ppl": {"w": 92.0}}, {"ppl": {"w": 97.0}}]
    s = spread.summarise(rows, ["w"], {"ppl": {"w": 50.0}})["w"]
    mean = (90 + 92 + 97) / 3
    assert s["mean"] == pytest.approx(mean)
    assert s["sd"] == pytest.approx(math.sqrt(((90 - mean) ** 2 + (92 - mean) ** 2 + (97 - mean) ** 2) / 2))
    # the mean's standard error, by hand: deviations from 93 are -3, -1, 4, sample variance 26 / 2 = 13
    assert s["se"] == pytest.approx(math.sqrt(13 / 3))
    assert (s["min"], s["max"], s["n"]) == (90.0, 97.0, 3)
    assert s["ratio"] == pytest.approx(mean / 50.0)
    one = spread.summarise(rows[:1], ["w"], None)["w"]
    assert one["sd"] is None and one["se"] is None and one["ratio"] is None


def test_table_prints_the_standard_error_only_with_several_seeds(spread):
    rows = {str(i): {"seed": i, "ppl": {"w": v}, "prune_s": 1.0, "source": "run"}
            for i, v in enumerate((90.0, 92.0, 97.0))}
    lines = spread.table({"corpora": "w", "rows": rows}).splitlines()
    se_lines = [line for line in lines if line.startswith("| standard error of the mean |")]
    assert se_lines == ["| standard error of the mean | 2.08 | | |"]  # sqrt(13 / 3) = 2.0817
    one = spread.table({"corpora": "w", "rows": {"0": rows["0"]}})
    assert "standard error" not in one


def test_seeds_run_resume_and_count_finished_runs(spread, folder, data_dir, tmp_path):
    args = _args(folder, data_dir)
    path = tmp_path / "seeds.json"
    own = ["--json", str(path), "--windows", "2", "--corpora", "wikitext2", "--no-dense"]
    calls: list[list[str]] = []

    def runner(argv):
        calls.append(argv)
        _cli(argv)

    assert spread.main(["--seeds", "0,1", "--keep-models", str(tmp_path / "kept"), *own, "--", *args], runner) == 0
    assert [a[a.index("--seed") + 1] for a in calls] == ["0", "1"]
    data = json.loads(path.read_text())
    ppl = {int(k): r["ppl"]["wikitext2"] for k, r in data["rows"].items()}
    kept = {s: json.loads((tmp_path / "kept" / f"seed-{s}" / "report.json").read_text()) for s in (0, 1)}
    assert {s: r["settings"]["seed"] for s, r in kept.items()} == {0: 0, 1: 1}
    assert ppl == {s: r["eval"]["ppl"]["wikitext2"] for s, r in kept.items()}
    assert ppl[0] != ppl[1]  # the seed draws other calibration tokens: another model
    assert ppl[0] == pytest.approx(_plain_prune(args, tmp_path / "again0", 0))  # a row is what the seed gives

    # a run made by hand with seed 2 is counted without running it again; seed 0 and 1 are not re-run
    hand = _plain_prune(args, tmp_path / "hand2", 2)
    calls.clear()
    assert spread.main(["--seeds", "0,1,3", "--add", str(tmp_path / "hand2"), *own, "--", *args], runner) == 0
    assert [a[a.index("--seed") + 1] for a in calls] == ["3"]
    data = json.loads(path.read_text())
    assert sorted(data["rows"]) == ["0", "1", "2", "3"]
    assert data["rows"]["2"]["ppl"]["wikitext2"] == hand and data["rows"]["2"]["source"] == str(tmp_path / "hand2")
    values = [data["rows"][k]["ppl"]["wikitext2"] for k in ("0", "1", "2", "3")]
    assert data["summary"]["wikitext2"]["mean"] == pytest.approx(statistics.fmean(values))
    assert data["summary"]["wikitext2"]["n"] == 4
    assert "--seed SEED" in data["command"] and "--nsamples 16" in data["command"]

    # the same settings as a preset-free command typed in another order are the same command
    reordered = [*args[8:], *args[:8]]
    calls.clear()
    assert spread.main(["--seeds", "0", *own, "--", *reordered], runner) == 0 and calls == []


def test_a_finished_run_of_other_settings_or_windows_is_refused(spread, folder, data_dir, tmp_path):
    args = _args(folder, data_dir)
    path = tmp_path / "seeds.json"
    own = ["--json", str(path), "--windows", "2", "--corpora", "wikitext2", "--no-dense"]
    _plain_prune(_args(folder, data_dir, nsamples=8), tmp_path / "other", 4)
    _plain_prune(args, tmp_path / "three", 5, windows=3)

    def never(argv):
        raise AssertionError("ran a seed")

    with pytest.raises(SystemExit, match="nsamples: 8 != 16"):
        spread.main(["--seeds", "0", "--add", str(tmp_path / "other"), *own, "--", *args], never)
    with pytest.raises(SystemExit, match="not evaluated on 2 windows of wikitext2"):
        spread.main(["--seeds", "0", "--add", str(tmp_path / "three"), *own, "--", *args], never)
    assert not path.exists()  # refused before anything was written

    # a JSON of another command is not extended with this one's seeds
    path.write_text(json.dumps({"rows": {}, "settings": {"nsamples": 8}, "windows": 2, "corpora": "wikitext2"}))
    with pytest.raises(SystemExit, match="holds another command"):
        spread.main(["--seeds", "0", *own, "--", *args], never)


@pytest.mark.parametrize("extra,needle", [(["--seed", "3"], "--seed"), (["--see", "3"], "--see"),
                                          (["--out", "x"], "--out"), (["--max-windows=9"], "--max-windows")])
def test_flags_the_script_sets_are_refused(spread, tmp_path, extra, needle):
    path = tmp_path / "seeds.json"
    with pytest.raises(SystemExit, match=needle):
        spread.main(["--seeds", "0", "--json", str(path), "--no-dense", "--", "--sparsity", "0.1", *extra],
                    lambda argv: pytest.fail("ran a seed"))
    assert not path.exists()


def test_bad_prune_settings_are_refused_before_any_seed(spread, tmp_path):
    from daprune.errors import ConfigError

    path = tmp_path / "seeds.json"
    with pytest.raises(ConfigError, match="--sparsity must be in"):
        spread.main(["--seeds", "0", "--json", str(path), "--no-dense", "--", "--sparsity", "2"],
                    lambda argv: pytest.fail("ran a seed"))
    assert not path.exists()


def test_a_setting_newer_than_the_report_counts_as_its_default(spread, tmp_path):
    """A report written before a setting existed ran as the setting's default does: it matches a command that
    leaves the setting alone, and not one that sets it."""
    args = ["--sparsity", "0.1", "--nsamples", "16"]
    settings = {**spread.expected_settings(args), "seed": 7}
    del settings["compensate_mean"]  # as if the report predates --compensate-mean
    run = tmp_path / "old"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({
        "settings": settings, "timings": {"total_s": 1.0}, "params": {"after": 9, "achieved_sparsity": 0.1},
        "eval": {"ppl_details": {"wikitext2": {"ppl": 33.0, "windows": 2}}}}))
    row = spread.read_run(run, spread.expected_settings(args), ["wikitext2"], 2)
    assert (row["seed"], row["ppl"]) == (7, {"wikitext2": 33.0})
    with pytest.raises(SystemExit, match="compensate_mean: None != True"):
        spread.read_run(run, spread.expected_settings([*args, "--compensate-mean"]), ["wikitext2"], 2)

    # a results JSON written before that setting existed is continued the same way, and refused once it is set
    path = tmp_path / "seeds.json"
    shared = {k: v for k, v in spread.expected_settings(args).items() if k not in ("seed", "preset", "compensate_mean")}
    path.write_text(json.dumps({"rows": {}, "settings": shared, "windows": 2, "corpora": "wikitext2"}))
    own = ["--json", str(path), "--windows", "2", "--corpora", "wikitext2", "--no-dense", "--add", str(run)]
    assert spread.main(own + ["--", *args], lambda argv: pytest.fail("ran a seed")) == 0
    assert json.loads(path.read_text())["rows"]["7"]["ppl"] == {"wikitext2": 33.0}
    path.write_text(json.dumps({"rows": {}, "settings": shared, "windows": 2, "corpora": "wikitext2"}))
    with pytest.raises(SystemExit, match="compensate_mean: None != True"):
        spread.main(own[:-2] + ["--", *args, "--compensate-mean"], lambda argv: pytest.fail("ran a seed"))


def test_dense_from_another_json_gives_the_ratio_without_evaluating(spread, tmp_path, monkeypatch):
    """--dense-from copies the dense row of another JSON of the same model, windows and corpora (the ratio to dense
    follows from it), and refuses one that evaluated another model or other windows or corpora, before any work."""
    monkeypatch.setattr(spread, "run_dense", lambda *a: pytest.fail("evaluated the dense model"))
    args = ["--sparsity", "0.1", "--nsamples", "16"]
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.json").write_text(json.dumps({
        "settings": {**spread.expected_settings(args), "seed": 3}, "timings": {"total_s": 1.0},
        "params": {"after": 9, "achieved_sparsity": 0.1},
        "eval": {"ppl_details": {"wikitext2": {"ppl": 33.0, "windows": 2}}}}))
    model = spread.expected_settings(args)["model"]
    source = tmp_path / "other.json"

    def write_source(**change):
        data = {"rows": {}, "settings": {"model": model}, "windows": 2, "corpora": "wikitext2,ptb",
                "dense": {"command": "daprune eval", "ppl": {"wikitext2": 20.0, "ptb": 40.0}}}
        data.update(change)
        source.write_text(json.dumps(data))

    path = tmp_path / "seeds.json"
    own = ["--json", str(path), "--windows", "2", "--corpora", "wikitext2", "--add", str(run)]
    never = lambda argv: pytest.fail("ran a seed")  # noqa: E731
    for change, corpora, needle in (({"windows": 3}, "wikitext2", "evaluated on 3 windows"),
                                    ({}, "wikitext2,lambada-heldout", "wants 2 windows of wikitext2, lambada"),
                                    ({"settings": {"model": "elsewhere"}}, "wikitext2", "its model is 'elsewhere'"),
                                    ({"dense": None}, "wikitext2", "has no dense row")):
        write_source(**change)
        argv = [*own[:4], "--corpora", corpora, *own[6:], "--dense-from", str(source), "--", *args]
        with pytest.raises(SystemExit, match=needle):
            spread.main(argv, never)
        assert not path.exists()
    write_source()
    with pytest.raises(SystemExit, match="give one"):
        spread.main([*own, "--dense-from", str(source), "--no-dense", "--", *args], never)
    assert not path.exists()

    assert spread.main([*own, "--dense-from", str(source), "--", *args], never) == 0
    data = json.loads(path.read_text())
    assert data["dense"]["ppl"] == {"wikitext2": 20.0} and data["dense"]["from"] == str(source)
    assert data["summary"]["wikitext2"]["ratio"] == pytest.approx(33.0 / 20.0)
