"""benchmarks/compare_table.py: merging new rows into the published table."""

from __future__ import annotations

import json

from conftest import benchmark_module


def _compare_table():
    return benchmark_module("compare_table")


META = {"model": "m.gguf", "sparsity": 0.2, "max_windows": 256, "ppl": "wikitext2,ptb", "tasks": "", "limit": None,
        "zeroshot_dtype": "float32"}


def _table(keys, **meta):
    return {**META, **meta, "rows": [{"key": k, "ppl": {"wikitext2": float(i)}} for i, k in enumerate(keys)]}


def test_a_new_row_joins_the_published_table_in_table_order(tmp_path):
    ct = _compare_table()
    out = tmp_path / "published.json"
    published = {**_table(["dense", "wanda-sp", "ours-c"]), "zeroshot_run": {"tasks": "piqa", "limit": 100}}
    out.write_text(json.dumps(published))
    merged = ct.with_published({**_table(["wanda-sp", "ours-c-hrec"]), "zeroshot_run": {"tasks": None}}, out)
    assert [r["key"] for r in merged["rows"]] == ["dense", "wanda-sp", "ours-c", "ours-c-hrec"]
    wanda = next(r for r in merged["rows"] if r["key"] == "wanda-sp")
    assert wanda["ppl"] == {"wikitext2": 0.0}  # the new run's row replaces the published one (1.0)
    ours = next(r for r in merged["rows"] if r["key"] == "ours-c")
    assert ours["ppl"] == {"wikitext2": 2.0}  # kept from the published table
    assert merged["zeroshot_run"] == {"tasks": "piqa", "limit": 100}  # what only the published table knew stays
    assert ct.with_published({"rows": []}, out)["rows"] == json.loads(out.read_text())["rows"]


def test_rows_measured_differently_are_not_mixed(tmp_path):
    ct = _compare_table()
    out = tmp_path / "published.json"
    out.write_text(json.dumps(_table(["dense", "ours-c"], max_windows=64)))
    merged = ct.with_published(_table(["ours-c-hrec"]), out)
    assert [r["key"] for r in merged["rows"]] == ["ours-c-hrec"]
    assert ct.with_published(_table(["x"]), tmp_path / "none.json")["rows"][0]["key"] == "x"


def test_replace_between_rewrites_only_the_marked_table():
    from daprune.evaluation.compare import replace_between

    markers = ("<!-- t -->", "<!-- /t -->")
    page = "intro\n<!-- t -->\nold\ntable\n<!-- /t -->\nprose after\n"
    assert replace_between(page, markers, "new") == "intro\n<!-- t -->\nnew\n<!-- /t -->\nprose after\n"
    assert replace_between("no markers here\n", markers, "new") == "no markers here\n"
