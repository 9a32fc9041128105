"""The comparison table on tiny models: every row prunes to the same budget, JSON and layout are complete."""

from __future__ import annotations

import dataclasses
import json
import mmap

import pytest
import torch
from conftest import CharTokenizer, tiny_model

from daprune.config import PruneConfig
from daprune.errors import ConfigError
from daprune.evaluation import compare
from daprune.evaluation.perplexity import perplexity_of_ids

EVAL_IDS = torch.randint(0, 128, (4 * 32,), generator=torch.Generator().manual_seed(5))


pytestmark = pytest.mark.usefixtures("one_thread")


def _loader():
    return tiny_model(layers=4), CharTokenizer()


def _evaluator(model, tok):
    r = perplexity_of_ids(model, EVAL_IDS, seqlen=32, progress=False)
    return {"ppl": {"wikitext2": r["ppl"]}, "ppl_details": {"wikitext2": r}}


# channel_multiple=1: tiny FFNs (64 wide) would round the default multiple's budget too coarsely to compare rows
BASE = PruneConfig(sparsity=0.2, layers="1:-1", calibration="random", nsamples=8, seqlen=32, batch_size=8,
                   channel_multiple=1)


def test_select_rows():
    keys = [r.key for r in compare.select_rows(None)]
    assert keys == ["dense", "random", "l1", "l2", "ours-sg", "ours-sg-rec", "ours-sg-hrec", "ours-sg-hrec-block",
                    "taylor-e1", "taylor-vector", "wanda-sp", "flap", "ours-c", "ours-c-rec", "ours-c-hrec",
                    "ours-c-hrec-block"]
    assert [r.key for r in compare.select_rows("ours-c,dense")] == ["dense", "ours-c"]  # table order
    assert len(compare.select_rows("all")) == len(compare.ROWS)
    with pytest.raises(ConfigError, match="nope"):
        compare.select_rows("dense,nope")


def test_row_configs():
    flap = compare.row_config(compare.ROW_BY_KEY["flap"], BASE)
    assert (flap.ffn_criterion, flap.head_criterion, flap.schedule) == ("flap", "flap", "adaptive")
    assert flap.calibration == "random" and flap.head_split == BASE.head_split
    l2 = compare.row_config(compare.ROW_BY_KEY["l2"], BASE)
    assert l2.calibration == "self"  # the data-free group never sees real text
    rec = compare.row_config(compare.ROW_BY_KEY["ours-c-rec"], BASE)
    assert (rec.ffn_criterion, rec.head_criterion, rec.recovery) == ("second-moment", "similarity", "paper")
    first = compare.row_config(compare.ROW_BY_KEY["ours-sg-fisher-first"], BASE)
    assert (first.error_weight, first.token_weight, first.calibration) == ("fisher", "first", "self")
    for row in compare.ROWS:
        cfg = compare.row_config(row, BASE)
        cfg.validate()
        if row.key.startswith("ours"):  # ours keeps the default FFN selection unless the row says otherwise
            assert cfg.selection == (row.settings.get("selection") or PruneConfig().selection)
        elif row.key != "dense":  # a baseline's own scores pick its channels
            assert cfg.selection == "score", row.key


def test_reusable_rows_compare_full_settings():
    rows = compare.select_rows("dense,l2,ours-c")
    meta = {"model": None, "sparsity": 0.2, "max_windows": 8, "ppl": "wikitext2", "tasks": "", "limit": None}
    old_rows = [{"key": "dense", "settings": None},
                {"key": "l2", "settings": compare.row_config(compare.ROW_BY_KEY["l2"], BASE).to_dict()},
                {"key": "ours-c", "settings": {**compare.row_config(compare.ROW_BY_KEY["ours-c"], BASE).to_dict(),
                                               "selection": "something-else"}}]
    got = compare.reusable_rows({**meta, "rows": old_rows}, meta, rows, BASE)
    assert sorted(got) == ["dense", "l2"]  # ours-c ran with other settings: run again
    assert compare.reusable_rows({**meta, "max_windows": 9, "rows": old_rows}, meta, rows, BASE) == {}


def test_table_rows_share_the_budget(tmp_path):
    rows = compare.select_rows("dense,l2,flap,ours-c-rec")  # the other criteria run end to end in test_criteria
    path = tmp_path / "t.json"
    seen = []
    table = compare.run_table(rows, BASE, _loader, _evaluator, json_path=str(path), meta={"model": "tiny"},
                              on_row=lambda r: seen.append(r["key"]))
    assert seen == [r.key for r in rows]
    data = json.loads(path.read_text())
    assert [r["key"] for r in data["rows"]] == seen and data["model"] == "tiny"
    dense = data["rows"][0]
    assert dense["sparsity"] == 0 and dense["settings"] is None
    pruned = data["rows"][1:]
    for r in pruned:
        assert r["settings"]["sparsity"] == 0.2 and r["settings"]["layers"] == "1:-1"
        assert r["settings"]["nsamples"] == 8
        # same budget: every row removes at least the target in weights; FLAP's compensation biases (and the
        # zero biases that keep its config loadable) are counted in "params" and reported in "bias_params"
        weights = r["params"] - r["bias_params"]
        assert (dense["params"] - weights) / dense["params"] >= 0.2, (r["key"], weights)
        assert abs(weights - (pruned[0]["params"] - pruned[0]["bias_params"])) / dense["params"] < 0.005
        assert r["peak_rss_prune_mb"] > 0 and r["prune_s"] > 0
        assert r["ppl"]["wikitext2"] > 0
    by = {r["key"]: r for r in data["rows"]}
    assert by["l2"]["report"]["calibration"]["source"] == "self"
    assert by["flap"]["bias_params"] > 0 and by["l2"]["bias_params"] == 0
    assert by["flap"]["settings"]["schedule"] == "adaptive"
    md = compare.format_markdown(table)
    assert "*Data-free (calibration: self-generated)*" in md and "*Data-dependent*" in md
    assert md.index("| L2 |") < md.index("Data-dependent") < md.index("| FLAP |")


def test_resume_keeps_finished_rows(tmp_path):
    rows = compare.select_rows("dense,wanda-sp")
    done = {"dense": {"key": "dense", "label": "Dense", "group": "dense", "params": 1, "sparsity": 0.0,
                      "prune_s": 0.0, "peak_rss_prune_mb": 1.0, "ppl": {"wikitext2": 1.0}}}
    calls = []

    def loader():
        calls.append(1)
        return _loader()

    table = compare.run_table(rows, BASE, loader, _evaluator, done=done)
    assert len(calls) == 1 and table["rows"][0] is done["dense"]


def test_resume_file_keeps_reused_rows_not_reached_yet(tmp_path):
    """A resumed run stopped after its first row must not drop the later rows it was going to reuse."""
    rows = compare.select_rows("dense,wanda-sp")
    later = {"key": "wanda-sp", "label": "Wanda-sp", "group": "data-dependent", "params": 1, "sparsity": 0.2,
             "prune_s": 1.0, "peak_rss_prune_mb": 1.0, "ppl": {"wikitext2": 2.0}}
    path = tmp_path / "t.json"
    seen = []

    def stop_after_first(rec):
        seen.append(json.loads(path.read_text()))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        compare.run_table(rows, BASE, _loader, _evaluator, done={"wanda-sp": later}, json_path=str(path),
                          on_row=stop_after_first)
    assert [r["key"] for r in seen[0]["rows"]] == ["dense", "wanda-sp"] and seen[0]["rows"][1] == later


def _fresh_pages(nbytes: int) -> mmap.mmap:
    """Touch a new anonymous mapping: unlike bytearray, it cannot reuse heap pages that are already resident."""
    block = mmap.mmap(-1, nbytes)
    for off in range(0, nbytes, mmap.PAGESIZE):
        block[off] = 1
    return block


def test_peak_rss_tracks_allocation():
    mem = compare.PeakRSS()
    mem.reset()
    before = mem.peak()
    block = _fresh_pages(64 * 2**20)
    assert mem.peak() - before > 48 * 2**20
    mem.stop()
    block.close()


def test_cli_compare(tmp_path, monkeypatch, data_dir, capsys):
    """The subcommand end to end: real WikiText-2/PTB windows (a few), a tiny model behind load_model."""
    import daprune.models.loading as loading
    from daprune.cli import main

    monkeypatch.setattr(loading, "load_model", lambda *a, **k: (tiny_model(layers=4), CharTokenizer(), None))
    out = tmp_path / "runs" / "compare" / "c.json"  # a folder that does not exist yet is made
    rc = main(["compare", "--rows", "dense,l2", "--layers", "1:-1", "--calibration", "random", "--nsamples", "8",
               "--seqlen", "32", "--max-windows", "3", "--json", str(out), "--data-dir", data_dir, "--quiet",
               "--no-isolate"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "| Dense |" in text and "| L2 |" in text and "WikiText-2 PPL" in text and "PTB PPL" in text
    data = json.loads(out.read_text())
    assert data["max_windows"] == 3 and data["rows"][1]["eval"]["ppl_details"]["ptb"]["windows"] == 3


def test_similarity_figure_from_model_and_report(tmp_path):
    from daprune.api import prune
    from daprune.evaluation.similarity_plot import draw, graphs_from_model, graphs_from_report

    model = tiny_model(layers=3)
    graphs = graphs_from_model(model, CharTokenizer(), [2, 1], calibration="random", nsamples=4, seqlen=16)
    assert [g.block for g in graphs] == [2, 1] and graphs[0].divergence.shape == (6, 6)
    assert graphs[0].groups == [[0, 1, 2], [3, 4, 5]]
    d = graphs[0].divergence
    assert torch.allclose(d, d.T) and float(d.diagonal().abs().max()) < 1e-6
    png = draw(graphs, tau=float(d.max()) + 1, out=tmp_path / "g.png")  # tau above all: complete graphs
    assert png.stat().st_size > 10_000
    res = prune(model=tiny_model(layers=3), tokenizer=CharTokenizer(), calibration="random", nsamples=8, seqlen=24,
                layers="1:", sparsity=0.2, head_split="paper", progress=False)
    (tmp_path / "report.json").write_text(json.dumps(res.report))
    from_report = graphs_from_report(tmp_path, [1])
    assert from_report[0].divergence.shape == (6, 6)
    assert sorted(from_report[0].pruned) == sorted(set(range(6)) - set(res.report["layers"][1]["kept_heads"]))
    draw(from_report, tau=0.05, out=tmp_path / "r.png")
    with pytest.raises(ConfigError, match="block 0"):
        graphs_from_report(tmp_path, [0])


def test_child_argv_forwards_the_settings():
    import argparse

    from daprune.cli import PLUGINS  # noqa: F401  (compare is registered as a plugin)

    parser = argparse.ArgumentParser()
    compare.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--sparsity", "0.3", "--max-windows", "7", "--calibration", "x.txt",
                              "--quiet"])
    argv = compare.child_argv(args, "flap", "/tmp/r.json")
    assert argv[1:8] == ["-m", "daprune.cli", "compare", "--rows", "flap", "--json", "/tmp/r.json"]
    assert "--no-isolate" in argv and "--quiet" in argv
    assert "--sparsity=0.3" in argv and "--max-windows=7" in argv and "--calibration=x.txt" in argv
    assert not any(a.startswith("--model") for a in argv)  # None: the child uses the same default
    # an empty --ppl (zero-shot only) must reach the child as empty, not fall back to the default corpora
    args = parser.parse_args(["compare", "--ppl=", "--tasks", "piqa"])
    child = parser.parse_args(compare.child_argv(args, "l2", "/tmp/r.json")[3:])
    assert child.ppl == "" and child.tasks == "piqa"


def test_child_sees_every_setting_of_the_parent():
    """Every option (but the row selection and where the row's JSON goes) reaches the row's child process:
    a setting dropped here silently changes what the child prunes (it once dropped --sparsity-basis)."""
    import argparse

    parser = argparse.ArgumentParser()
    compare.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--sparsity", "0.3", "--sparsity-basis", "blocks", "--kv-groups",
                              "--layers", "2:-1", "--head-split", "paper", "--tau", "0.1", "--nsamples", "4",
                              "--seqlen", "64", "--seed", "3", "--batch-size", "2", "--max-windows", "9",
                              "--model", "m.gguf", "--limit", "5", "--tasks", "piqa", "--ppl", "ptb",
                              "--self-temperature", "0.7", "--self-top-p", "1"])
    child = parser.parse_args(compare.child_argv(args, "l2", "/tmp/r.json")[3:])
    own = {"rows", "json", "isolate", "resume"}
    differ = {k: (v, getattr(child, k)) for k, v in vars(args).items() if k not in own and getattr(child, k) != v}
    assert differ == {"tau": (0.1, 0.05)}  # the L2 row judges no head by similarity: its child is not given --tau
    ours = parser.parse_args(compare.child_argv(args, "ours-sg", "/tmp/r.json")[3:])
    assert ours.tau == 0.1 and ours.head_split == "paper" and ours.kv_groups and ours.self_top_p == 1


def test_peak_rss_falls_back_to_sampling_when_kernel_reset_is_ignored(monkeypatch):
    """Some machines accept the clear_refs write but keep the old mark: sampling must take over."""
    monkeypatch.setattr(compare.PeakRSS, "_kernel_reset", staticmethod(lambda: False))
    mem = compare.PeakRSS()
    mem.reset()
    assert mem.method.startswith("psutil")
    before = mem.peak()
    block = _fresh_pages(64 * 2**20)
    assert mem.peak() - before > 48 * 2**20
    mem.stop()
    block.close()


def test_markdown_has_a_column_per_zero_shot_task():
    """Per-task accuracy in the metric the mean uses (acc_norm for HellaSwag, acc for PIQA), then the mean."""
    zs = {"tasks": {"piqa": {"acc": 0.61, "acc_norm": 0.60}, "hellaswag": {"acc": 0.30, "acc_norm": 0.42}},
          "mean_metrics": {"piqa": "acc", "hellaswag": "acc_norm"}, "mean": 0.515}
    base = {"group": "dense", "params": 100, "sparsity": 0.0, "prune_s": 0.0, "peak_rss_prune_mb": 1.0,
            "ppl": {"wikitext2": 10.0}}
    table = {"rows": [{**base, "key": "dense", "label": "Dense", "zeroshot": zs, "zeroshot_mean": 0.515},
                      {**base, "key": "l2", "label": "L2", "group": "data-free"}]}
    lines = compare.format_markdown(table).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    assert header[header.index("WikiText-2 PPL") + 1:][:3] == ["piqa", "hellaswag", "Zero-shot mean"]
    dense = [c.strip() for c in lines[2].strip("|").split("|")]
    assert dense[3:6] == ["61.0", "42.0", "51.50"]
    l2 = [c.strip() for c in lines[-1].strip("|").split("|")]
    assert l2[3:6] == ["-", "-", "-"]


def test_zeroshot_runs_in_the_requested_dtype(monkeypatch):
    import argparse

    import daprune.evaluation.zeroshot as zs_mod

    seen = {}

    def fake(model, tok, tasks, **kw):
        seen["dtype"], seen["tasks"], seen["limit"] = next(model.parameters()).dtype, tasks, kw["limit"]
        return {"tasks": {}, "mean": 0.5}

    monkeypatch.setattr(zs_mod, "evaluate_zeroshot", fake)
    args = argparse.Namespace(tasks="piqa,arc_easy", limit=3, eval_batch_size=2, quiet=True,
                              zeroshot_dtype="bfloat16")
    out = compare._zeroshot_fn(args)(tiny_model("llama"), None)
    assert seen == {"dtype": torch.bfloat16, "tasks": ["piqa", "arc_easy"], "limit": 3}
    assert out["dtype"] == "bfloat16" and out["mean"] == 0.5


def test_merge_zeroshot_only_where_the_pruning_was_identical():
    settings = compare.row_config(compare.ROW_BY_KEY["l2"], BASE).to_dict()
    main = {"rows": [{"key": "dense", "settings": None, "params": 10},
                     {"key": "l2", "settings": settings, "params": 8},
                     {"key": "flap", "settings": {"x": 1}, "params": 8}]}
    zs = {"tasks": "piqa", "limit": 5, "rows": [
        {"key": "dense", "settings": None, "params": 10, "zeroshot": {"mean": 0.6}, "zeroshot_mean": 0.6},
        {"key": "l2", "settings": settings, "params": 8, "zeroshot": {"mean": 0.5}, "zeroshot_mean": 0.5},
        {"key": "flap", "settings": {"x": 2}, "params": 8, "zeroshot": {"mean": 0.4}, "zeroshot_mean": 0.4}]}
    out = compare.merge_zeroshot(main, zs)
    assert [r.get("zeroshot_mean") for r in out["rows"]] == [0.6, 0.5, None]
    assert out["zeroshot_run"]["limit"] == 5 and "zeroshot" not in main["rows"][0]


def _full_result(prune_settings=None, limit=None, mean=0.45):
    zs = {"tasks": {"piqa": {"acc": 0.6, "acc_norm": 0.59}, "hellaswag": {"acc": 0.3, "acc_norm": 0.3}},
          "mean_metrics": {"piqa": "acc", "hellaswag": "acc_norm"}, "mean": mean, "limit": limit,
          "wall_s": 1234.0, "settings": {"dtype": "bf16"}}
    return {**zs, "prune_settings": prune_settings} if prune_settings is not None else zs


def test_full_zeroshot_results_attach_only_to_the_model_they_scored():
    settings = compare.row_config(compare.ROW_BY_KEY["ours-c"], BASE).to_dict()
    base = {"group": "data-dependent", "sparsity": 0.2, "prune_s": 1.0, "peak_rss_prune_mb": 1.0,
            "ppl": {"wikitext2": 10.0}}
    table = {"rows": [{**base, "key": "dense", "label": "Dense", "group": "dense", "settings": None, "params": 10},
                      {**base, "key": "ours-c", "label": "Ours (Calibration)", "settings": settings, "params": 8},
                      {**base, "key": "l2", "label": "L2", "settings": {"x": 1}, "params": 8}]}
    out = compare.merge_full_zeroshot(table, {"dense": _full_result(mean=0.5), "ours-c": _full_result(settings)})
    assert [r.get("zeroshot_full", {}).get("mean") for r in out["rows"]] == [0.5, 0.45, None]
    assert "zeroshot_full" not in table["rows"][0]
    lines = compare.format_markdown(out).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    column = header.index("Mean, full sets")
    assert [[c.strip() for c in line.strip("|").split("|")][column] for line in lines[2:] if "*" not in line] == [
        "50.00", "45.00", "-"]
    full = compare.format_full_zeroshot(out).splitlines()
    assert len(full) == 4 and full[0].split("|")[3:5] == [" piqa ", " hellaswag "]
    assert [c.strip() for c in full[3].strip("|").split("|")][2:] == ["60.0", "30.0", "45.00", "1234"]

    # a folder pruned later records settings the row predates: at their defaults it is the row's model
    legacy = {k: v for k, v in settings.items() if k not in ("owl_lambda", "layout")}
    later = compare.merge_full_zeroshot({**table, "rows": [dict(table["rows"][1], settings=legacy)]},
                                        {"ours-c": _full_result(settings)})
    assert later["rows"][0]["zeroshot_full"]["mean"] == 0.45
    other = dict(settings, seed=1)
    for bad in ({"ours-c": _full_result(other)},  # pruned with other settings
                {"ours-c": _full_result(dict(settings, owl_lambda=0.1))},  # a later setting, not at its default
                {"dense": _full_result(settings)},  # a pruned model's result on the dense row
                {"ours-c": _full_result()},  # a dense model's result on a pruned row
                {"dense": _full_result(limit=100)},  # not the full sets
                {"flap": _full_result()}):  # no such row
        with pytest.raises(ValueError):
            compare.merge_full_zeroshot(table, bad)


def test_first_n_document_results_make_their_own_column_and_never_mix_with_full_sets():
    """A bigger model gets the first N docs per task instead of the full sets: the column says N, and a
    result of another size (full sets, another N) is refused under it, as a limited one is under full sets."""
    settings = compare.row_config(compare.ROW_BY_KEY["ours-c"], BASE).to_dict()
    base = {"group": "data-dependent", "sparsity": 0.2, "prune_s": 1.0, "peak_rss_prune_mb": 1.0,
            "ppl": {"wikitext2": 10.0}}
    table = {"rows": [{**base, "key": "dense", "label": "Dense", "group": "dense", "settings": None, "params": 10},
                      {**base, "key": "ours-c", "label": "Ours (Calibration)", "settings": settings, "params": 8}]}
    out = compare.merge_full_zeroshot(table, {"dense": _full_result(limit=1000, mean=0.5),
                                              "ours-c": _full_result(settings, limit=1000)}, limit=1000)
    header = [c.strip() for c in compare.format_markdown(out).splitlines()[0].strip("|").split("|")]
    assert "Mean, first 1000 docs" in header and "Mean, full sets" not in header
    assert [r["zeroshot_full"]["limit"] for r in out["rows"]] == [1000, 1000]
    for bad, limit in (({"dense": _full_result()}, 1000), ({"dense": _full_result(limit=500)}, 1000),
                       ({"dense": _full_result(limit=1000)}, None)):
        with pytest.raises(ValueError, match="docs per task|full sets"):
            compare.merge_full_zeroshot(table, bad, limit)
    with pytest.raises(ValueError, match="positive"):
        compare.merge_full_zeroshot(table, {}, 0)


def test_rows_recorded_before_a_setting_existed_are_reused_only_at_its_default():
    """A row saved before e.g. ``layout`` existed stands when the new run uses that setting's default."""
    rows = compare.select_rows("dense,l2")
    meta = {"model": None, "sparsity": 0.2, "max_windows": 8, "ppl": "wikitext2", "tasks": "", "limit": None}
    settings = compare.row_config(compare.ROW_BY_KEY["l2"], BASE).to_dict()
    older = {k: v for k, v in settings.items() if k not in ("layout", "save_dtype")}
    old = {**meta, "rows": [{"key": "dense", "settings": None}, {"key": "l2", "settings": older}]}
    assert sorted(compare.reusable_rows(old, meta, rows, BASE)) == ["dense", "l2"]
    uniform = dataclasses.replace(BASE, layout="uniform")
    assert sorted(compare.reusable_rows(old, meta, rows, uniform)) == ["dense"]
    other_multiple = dataclasses.replace(BASE, channel_multiple=16)  # recorded in the old row: compared
    assert sorted(compare.reusable_rows(old, meta, rows, other_multiple)) == ["dense"]


def test_sampling_settings_reach_exactly_the_rows_that_generate():
    hot = dataclasses.replace(BASE, self_gen={"temperature": 0.7, "top_p": 0.9})
    assert compare.row_config(compare.ROW_BY_KEY["ours-sg"], hot).self_gen == {"temperature": 0.7, "top_p": 0.9}
    assert compare.row_config(compare.ROW_BY_KEY["wanda-sp"], hot).self_gen == {"temperature": 1.0, "top_p": 1.0}
    compare.row_config(compare.ROW_BY_KEY["wanda-sp"], hot).validate()  # so the peer's own check passes
    on_self = dataclasses.replace(hot, calibration="self")
    assert compare.row_config(compare.ROW_BY_KEY["wanda-sp"], on_self).self_gen["top_p"] == 0.9


def test_sampling_settings_without_a_generating_row_are_refused(capsys):
    from daprune.cli import main

    rc = main(["compare", "--rows", "dense,wanda-sp", "--calibration", "random", "--self-top-p", "0.9", "--quiet",
               "--no-isolate"])
    err = capsys.readouterr().err
    assert rc == 2 and "no selected row generates" in err and "Traceback" not in err
    rc = main(["compare", "--rows", "ours-sg", "--self-top-p", "1.5", "--quiet", "--no-isolate"])
    assert rc == 2 and "--self-top-p must be in (0, 1]" in capsys.readouterr().err


def test_rows_recorded_with_the_removed_self_generation_keys_are_reused():
    """``self_gen`` once also held max_new_tokens / prompt, which changed nothing: such rows still stand, and a row
    whose sampling really differs does not."""
    rows = compare.select_rows("dense,ours-sg")
    meta = {"model": None, "sparsity": 0.2, "max_windows": 8, "ppl": "wikitext2", "tasks": "", "limit": None}
    settings = compare.row_config(compare.ROW_BY_KEY["ours-sg"], BASE).to_dict()
    older = {**settings, "self_gen": {**settings["self_gen"], "max_new_tokens": None, "prompt": "bos"}}
    old = {**meta, "rows": [{"key": "dense", "settings": None}, {"key": "ours-sg", "settings": older}]}
    assert sorted(compare.reusable_rows(old, meta, rows, BASE)) == ["dense", "ours-sg"]
    hotter = {**older, "self_gen": {**older["self_gen"], "temperature": 1.5}}
    old["rows"][1]["settings"] = hotter
    assert sorted(compare.reusable_rows(old, meta, rows, BASE)) == ["dense"]
    # the default was top-p 0.95 until the default became 1: such rows re-run, they were sampled differently
    old["rows"][1]["settings"] = {**older, "self_gen": {**older["self_gen"], "top_p": 0.95}}
    assert sorted(compare.reusable_rows(old, meta, rows, BASE)) == ["dense"]


def test_running_some_rows_into_a_table_keeps_its_other_rows(tmp_path):
    """``--rows X --json T --resume`` adds X to table T: the rows of T not selected stay, in table order."""
    meta = {"model": None, "sparsity": 0.2, "max_windows": None, "ppl": "wikitext2", "tasks": "", "limit": None}
    flap = {"key": "flap", "label": "FLAP", "group": "data-dependent", "params": 1, "sparsity": 0.2,
            "prune_s": 1.0, "peak_rss_prune_mb": 1.0, "ppl": {"wikitext2": 3.0}}
    dense = {**flap, "key": "dense", "label": "Dense", "group": "dense"}
    old = {**meta, "rows": [dense, flap]}
    rows = compare.select_rows("wanda-sp")
    keep = compare.other_rows(old, meta, rows)
    assert [r["key"] for r in keep] == ["dense", "flap"]
    assert compare.other_rows({**old, "sparsity": 0.3}, meta, rows) == []  # another table: nothing to keep
    path = tmp_path / "t.json"
    table = compare.run_table(rows, BASE, _loader, _evaluator, json_path=str(path), keep=keep)
    assert [r["key"] for r in table["rows"]] == ["dense", "wanda-sp", "flap"]
    written = json.loads(path.read_text())["rows"]
    assert [r["key"] for r in written] == ["dense", "wanda-sp", "flap"] and written[2] == flap
    assert written[1]["ppl"]["wikitext2"] > 1.0
