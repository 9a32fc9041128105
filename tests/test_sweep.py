"""benchmarks/sparsity_sweep.py: one table per corpus from the per-sparsity compare JSONs."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path


def _sweep():
    path = Path(__file__).resolve().parents[1] / "benchmarks" / "sparsity_sweep.py"
    spec = importlib.util.spec_from_file_location("sparsity_sweep", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(key, label, group, wiki, ptb, prune_s=1.0):
    return {"key": key, "label": label, "group": group, "params": 10, "sparsity": 0.2, "prune_s": prune_s,
            "peak_rss_prune_mb": 100.0, "ppl": {"wikitext2": wiki, "ptb": ptb}}


def test_sweep_tables_from_finished_cells(tmp_path, monkeypatch):
    sw = _sweep()
    monkeypatch.chdir(tmp_path)
    runs = {0.2: [_row("dense", "Dense", "dense", 50.0, 90.0), _row("wanda-sp", "Wanda-sp", "data-dependent", 120.0,
                                                                      150.0),
                  _row("ours-c", "Ours (Calibration)", "data-dependent", 110.0, 160.0, prune_s=23.4)],
            0.5: [_row("wanda-sp", "Wanda-sp", "data-dependent", 900.0, 1500.0)]}
    for s, rows in runs.items():
        path = sw.run_path("smollm2", s)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"model": None, "threads": 1, "command": f"c{s}", "rows": rows}))
    table = sw.sweep_table(sw.load_sweep("smollm2"))
    assert [r["key"] for r in table] == ["dense", "wanda-sp", "ours-c"]
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
