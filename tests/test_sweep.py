"""benchmarks/sparsity_sweep.py: one table per corpus from the per-sparsity compare JSONs."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import benchmark_module


def _sweep():
    return benchmark_module("sparsity_sweep")


def _row(key, label, group, wiki, ptb, prune_s=1.0):
    return {"key": key, "label": label, "group": group, "params": 10, "sparsity": 0.2, "prune_s": prune_s,
            "peak_rss_prune_mb": 100.0, "ppl": {"wikitext2": wiki, "ptb": ptb}}


def test_sweep_tables_from_finished_cells(tmp_path, monkeypatch):
    sw = _sweep()
    monkeypatch.chdir(tmp_path)
    runs = {0.2: [_row("ours-c", "Ours (Calibration)", "data-dependent", 110.0, 160.0, prune_s=23.4),  # run order
                  _row("dense", "Dense", "dense", 50.0, 90.0),
                  _row("wanda-sp", "Wanda-sp", "data-dependent", 120.0, 150.0)],
            0.5: [_row("wanda-sp", "Wanda-sp", "data-dependent", 900.0, 1500.0)]}
    for s, rows in runs.items():
        path = sw.run_path("smollm2", s)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": None, "threads": 1, "command": f"c{s}", "rows": rows}))
    table = sw.sweep_table(sw.load_sweep("smollm2"))
    assert [r["key"] for r in table] == ["dense", "wanda-sp", "ours-c"]  # the paper's table order
    wiki = sw.format_model(table, "wikitext2").splitlines()
    assert wiki[0] == "| Method | 10% | 20% | 30% | 50% |"
    assert wiki[2] == "| Dense | 50.00 | 50.00 | 50.00 | 50.00 |"  # one dense run stands for every column
    assert wiki[3] == "| Wanda-sp | - | 120.00 | - | **900.00** |"  # the best pruned row of a column in bold
    assert wiki[4] == "| Ours (Calibration) | - | **110.00** | - | - |"
    ptb = sw.format_model(table, "ptb").splitlines()
    assert ptb[3] == "| Wanda-sp | - | **150.00** | - | **1,500** |"
    cost = sw.format_cost(table).splitlines()
    assert cost[3] == "| Ours (Calibration) | - | 23 / 100 | - | - |" and len(cost) == 4  # no dense row
    assert sw.compare_argv("m.gguf", 0.3, Path("o.json"), "ours-c")[:4] == ["compare", "--sparsity", "0.3",
                                                                             "--sparsity-basis"]


def test_merge_keeps_published_cells_a_new_run_does_not_replace(tmp_path, monkeypatch):
    """A fresh checkout has sweep.json but not the ignored per-cell runs: merging a new cell adds to it."""
    sw = _sweep()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sw, "plot_model", lambda *a, **k: None)
    for s, rows in {0.2: [_row("dense", "Dense", "dense", 50.0, 90.0), _row("ours-c", "Ours", "x", 110.0, 160.0)],
                    0.5: [_row("ours-c", "Ours", "x", 400.0, 500.0)]}.items():
        path = sw.run_path("smollm2", s)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": None, "threads": 1, "command": f"c{s}", "rows": rows}))
    Path("docs").mkdir()
    assert sw.cmd_merge(None) == 0
    sw.run_path("smollm2", 0.2).unlink()  # the ignored run folder of an earlier session is gone
    sw.run_path("smollm2", 0.5).write_text(json.dumps(
        {"model": None, "threads": 1, "command": "again", "rows": [_row("ours-c", "Ours", "x", 300.0, 450.0)]}))
    assert sw.cmd_merge(None) == 0
    merged = json.loads(Path("docs/sweep.json").read_text())["models"]["smollm2"]
    ours = next(r for r in merged["rows"] if r["key"] == "ours-c")
    assert ours["at"]["0.2"]["ppl"] == {"wikitext2": 110.0, "ptb": 160.0}  # kept from the published merge
    assert ours["at"]["0.5"]["ppl"] == {"wikitext2": 300.0, "ptb": 450.0}  # replaced by the new run
    assert merged["commands"] == {"0.2": "c0.2", "0.5": "again"}
    assert [r["key"] for r in merged["rows"]] == ["dense", "ours-c"]


def test_cost_columns_say_the_thread_count_their_cells_ran_at():
    """Cells run in different sessions (one thread beside another job, or two): each cost column names its own
    thread count; a published cell that predates the per-cell record takes the model's."""
    sw = _sweep()
    runs = {0.2: {"threads": 1, "rows": [_row("ours-c", "Ours", "o", 1.0, 1.0, prune_s=40.0)]},
            0.5: {"threads": 2, "rows": [_row("ours-c", "Ours", "o", 1.0, 1.0, prune_s=20.0)]}}
    table = sw.sweep_table(runs)
    head = sw.format_cost(table).splitlines()[0]
    assert head == "| Method | 10% s / MB | 20% s / MB (1 thr) | 30% s / MB | 50% s / MB (2 thr) |"
    old = [{**r, "at": {c: {k: v for k, v in at.items() if k != "threads"} for c, at in r["at"].items()}}
           for r in table]
    assert sw.format_cost(old, threads=1).splitlines()[0].count("(1 thr)") == 2


def test_summary_names_the_best_peer_of_each_cell_and_our_margin():
    sw = _sweep()
    runs = {0.2: {"rows": [_row("dense", "Dense", "dense", 50.0, 90.0), _row("wanda-sp", "Wanda-sp", "p", 120.0, 150.0),
                           _row("flap", "FLAP", "p", 118.0, 170.0), _row("random", "Random", "p", 900.0, 900.0),
                           _row("ours-c", "Ours (Calibration)", "o", 112.0, 160.0),
                           _row("ours-c-hrec", "Ours hrec", "o", 130.0, 141.0)]}}
    lines = sw.format_summary(sw.sweep_table(runs)).splitlines()
    assert lines[2] == "| Dense | 50.00 / 90.00 | 50.00 / 90.00 | 50.00 / 90.00 | 50.00 / 90.00 |"
    assert lines[3] == "| Ours (Calibration) | - | 112.00 / 160.00 | - | - |"
    assert lines[5] == "| Best peer | - | 118.00 / 150.00 (FLAP; Wanda-sp; best of 3 of 7 peers) | - | - |"
    # best of ours per corpus (112 from ours-c, 141 from hrec) against the best peer per corpus (118, 150)
    assert lines[6] == f"| Best of ours vs best peer | - | {112 / 118 - 1:+.1%} / {141 / 150 - 1:+.1%} | - | - |"
    assert len(lines) == 7  # random is a peer but not shown; only dense and our main rows are


def test_summary_says_nothing_partial_once_every_peer_ran():
    sw = _sweep()
    from daprune.evaluation.compare import ROWS

    peers = [r for r in ROWS if r.default and r.key != "dense" and not r.key.startswith("ours")]
    rows = [_row(r.key, r.label, r.group, 100.0 + n, 200.0 + n) for n, r in enumerate(peers)]
    lines = sw.format_summary(sw.sweep_table({0.2: {"rows": rows}})).splitlines()
    assert lines[-2] == f"| Best peer | - | 100.00 / 200.00 ({peers[0].label}) | - | - |"
    assert lines[-1] == "| Best of ours vs best peer | - | - | - | - |"  # no ours row ran
