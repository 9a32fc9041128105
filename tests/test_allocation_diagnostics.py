"""The two allocation diagnostics of session 29 (benchmarks/pooled_allocation.py, benchmarks/attention_drop.py):
pooling averages the curves and its report drives a prune; dropping attention equals a model whose attention writes
nothing."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CharTokenizer, benchmark_module, tiny_model

from daprune.allocation_search import mean_kl
from daprune.api import prune

KW = dict(tokenizer=CharTokenizer(), calibration="random", nsamples=16, seqlen=32, batch_size=4, progress=False,
          sparsity=0.3, schedule="sensitivity", sensitivity_nsamples=2)


def test_pooled_curves_are_the_mean_and_the_pooled_report_drives_a_prune(tmp_path, one_thread):
    pooled = benchmark_module("pooled_allocation")
    reports = [prune(model=tiny_model(), seed=s, **KW).report for s in (0, 1)]
    a, b = (r["allocation"]["curves"] for r in reports)
    assert any(a[k]["kl"] != b[k]["kl"] for k in a)  # the seeds measured differently, so the mean is a new curve
    report = pooled.pooled_report(reports, ["r0", "r1"])
    alloc = report["allocation"]
    for k in a:
        assert alloc["curves"][k]["params"] == a[k]["params"]
        mean = [(x + y) / 2 for x, y in zip(a[k]["kl"], b[k]["kl"], strict=True)]
        assert alloc["curves"][k]["kl"] == pytest.approx(mean)
    assert sum(alloc["targets"].values()) == pytest.approx(alloc["budget"])
    assert alloc["nsamples"] == 4 and alloc["pooled_from"] == ["r0", "r1"]

    folder = tmp_path / "pooled"
    folder.mkdir()
    pooled.atomic_write_json(folder / "report.json", report)
    run = prune(model=tiny_model(), allocation_from=str(folder), **{k: v for k, v in KW.items()
                                                                     if k != "sensitivity_nsamples"})
    assert run.report["allocation"]["targets"] == alloc["targets"]


def test_pooling_refuses_curves_measured_at_other_sizes(one_thread):
    pooled = benchmark_module("pooled_allocation")
    report = prune(model=tiny_model(), **KW).report
    other = copy.deepcopy(report)
    block = next(iter(other["allocation"]["curves"]))
    other["allocation"]["curves"][block]["params"][0] += 1
    with pytest.raises(SystemExit, match="other sizes"):
        pooled.pooled_report([report, other], ["a", "b"])


@torch.no_grad()
def test_dropped_attention_equals_a_zero_output_projection(one_thread):
    drop = benchmark_module("attention_drop")
    model = tiny_model(layers=3)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(0))
    before = model(ids).logits
    kls = drop.attention_drop_kls(model, ids)
    assert torch.equal(model(ids).logits, before)  # every hook removed
    dense = torch.log_softmax(before[:, ::4], -1)
    for i, layer in enumerate(model.model.layers):
        w = layer.self_attn.o_proj.weight
        saved = w.clone()
        w.zero_()  # no bias in this llama: the attention adds nothing to the residual stream
        expected = mean_kl(dense, torch.log_softmax(model(ids).logits[:, ::4], -1))
        w.copy_(saved)
        assert kls[i] == pytest.approx(expected, rel=1e-5)
        assert kls[i] > 1e-4
