"""``--schedule owl``: block shares from outlier ratios (OWL). Expected values are computed independently: the
outlier ratio by plain loops, the block inputs by hooks on the Hugging Face model's own linears, the shares by hand.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CharTokenizer
from test_families import tiny as tiny_llama_like

import daprune
from daprune.config import PruneConfig
from daprune.criteria.base import get_criterion
from daprune.errors import ConfigError
from daprune.models.adapter import get_adapter
from daprune.owl import outlier_ratio, owl_fractions, owl_targets
from daprune.pipeline import BlockPruner
from daprune.stores import ResidentStore

pytestmark = pytest.mark.usefixtures("one_thread")
SEQ = 24


def test_outlier_ratio_by_hand():
    w1 = torch.tensor([[1.0, -2.0], [0.5, 8.0]])
    w2 = torch.tensor([[3.0, 0.0, -30.0]])
    r1, r2 = torch.tensor([1.0, 0.5]), torch.tensor([2.0, 1.0, 1.0])
    scores = [abs(w1[i, j].item()) * r1[j].item() for i in range(2) for j in range(2)]
    scores += [abs(w2[0, j].item()) * r2[j].item() for j in range(3)]
    mean = sum(scores) / len(scores)  # pooled over both linears: 48.5 / 7
    for m in (1.0, 2.0, 3.0):
        want = sum(s > m * mean for s in scores) / len(scores)
        assert outlier_ratio([(w1, r1), (w2, r2)], m) == pytest.approx(want)
    assert outlier_ratio([(w1, r1), (w2, r2)], 2.0) == pytest.approx(1 / 7)  # only the 30


def test_owl_fractions_by_hand():
    got = owl_fractions({0: 0.1, 1: 0.3, 2: 0.2}, {0: 10, 1: 10, 2: 10}, share=0.2, lam=0.08)
    # scaled ratios 0, 1, 0.5 (mean 0.5): shares 0.2 + 0.16 * (0.5 - n)
    assert got == pytest.approx({0: 0.28, 1: 0.12, 2: 0.2})
    uneven = owl_fractions({0: 0.1, 1: 0.3}, {0: 30, 1: 10}, share=0.25, lam=0.1)
    assert uneven == pytest.approx({0: 0.25 + 0.2 * 0.25, 1: 0.25 - 0.2 * 0.75})  # weighted mean 0.25
    assert 30 * uneven[0] + 10 * uneven[1] == pytest.approx(0.25 * 40)  # the budget exactly
    assert owl_fractions({0: 0.2, 1: 0.2}, {0: 5, 1: 5}, 0.3, 0.08) == {0: 0.3, 1: 0.3}  # no spread to go on


@torch.no_grad()
def test_block_ratios_come_from_the_inputs_the_model_feeds_its_linears():
    model = tiny_llama_like("llama", layers=4)
    ids = torch.randint(3, 128, (6, SEQ), generator=torch.Generator().manual_seed(1))
    names = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    seen: dict[tuple[int, str], list[torch.Tensor]] = {}
    hooks = []
    for i, layer in enumerate(model.model.layers):
        for name, mod in layer.named_modules():
            if name.split(".")[-1] in names:
                key = (i, name.split(".")[-1])
                grab = lambda _m, a, key=key: seen.setdefault(key, []).append(a[0])  # noqa: E731
                hooks.append(mod.register_forward_pre_hook(grab))
    model(input_ids=ids, use_cache=False)
    for h in hooks:
        h.remove()
    want = {}
    for i, layer in enumerate(model.model.layers):
        mods = dict(layer.named_modules())
        pairs = []
        for name, mod in mods.items():
            short = name.split(".")[-1]
            if short in names:
                x = torch.cat(seen[(i, short)]).reshape(-1, mod.in_features).double()
                pairs.append((mod.weight.double(), x.pow(2).mean(0).sqrt()))
        want[i] = outlier_ratio(pairs, 2.0)
    adapter = get_adapter(model)
    for i in range(adapter.n_layers):
        adapter.block(i).to_canonical()
    cfg = PruneConfig(sparsity=0.2, channel_multiple=1, batch_size=4, schedule="owl")
    pruner = BlockPruner(cfg, get_criterion("second-moment"), get_criterion("second-moment"), 0.0)
    pruner.n_score = pruner.n_fit = 6
    store = ResidentStore(adapter)
    blocks = range(0, 4)
    budget = 0.2 * sum(p.numel() for i in blocks for p in adapter.block(i).layer.parameters())
    targets, entry = owl_targets(adapter, pruner, store.embed(ids, 4), store.layer_inputs(SEQ), blocks, budget,
                                 0.05, 2.0)
    assert entry["outlier_ratio"] == pytest.approx({str(i): want[i] for i in blocks}, abs=1e-6)
    assert len(set(want.values())) > 1
    assert math.isclose(sum(targets.values()), budget)


def _prune(**kw):
    settings = dict(sparsity=0.25, calibration="random", nsamples=8, seqlen=SEQ, batch_size=4, progress=False,
                    channel_multiple=1, schedule="owl", layers="0:", owl_threshold=2.0)
    settings.update(kw)
    return daprune.prune(model=tiny_llama_like("llama", layers=6), tokenizer=CharTokenizer(), **settings).report


def test_owl_schedule_prunes_each_block_by_its_share(tmp_path):
    from daprune.report import plot_allocation, summary

    rep = _prune()
    alloc = rep["allocation"]
    assert alloc["mode"] == "owl" and sorted(alloc["fractions"], key=int) == [str(i) for i in range(6)]
    assert math.isclose(sum(alloc["targets"].values()), 0.25 * rep["params"]["before"])
    fractions = alloc["fractions"]
    assert max(fractions.values()) - min(fractions.values()) == pytest.approx(2 * 0.08)  # the default lambda
    ratios = alloc["outlier_ratio"]
    most, least = max(ratios, key=ratios.get), min(ratios, key=ratios.get)
    assert fractions[most] < fractions[least]  # more outliers, smaller share
    by_block = {str(r["index"]): r for r in rep["layers"]}
    assert all(by_block[b]["plan"]["params"] >= t for b, t in alloc["targets"].items())
    assert sum(r["plan"]["params"] for r in rep["layers"] if r["pruned"]) == rep["params"]["removed"]
    assert "allocation     owl" in summary(rep)
    pytest.importorskip("matplotlib")
    assert plot_allocation(alloc, tmp_path / "allocation.png").stat().st_size > 1000


def test_lambda_changes_what_is_removed():
    narrow, wide = _prune(owl_lambda=0.02), _prune(owl_lambda=0.15)
    spread = [max(r["allocation"]["fractions"].values()) - min(r["allocation"]["fractions"].values())
              for r in (narrow, wide)]
    assert spread == pytest.approx([0.04, 0.30])
    assert [r["kept_channels"] for r in narrow["layers"]] != [r["kept_channels"] for r in wide["layers"]]


def test_settings_owl_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match="owl-lambda only matters"):
        PruneConfig(owl_lambda=0.1).validate()
    with pytest.raises(ConfigError, match="owl-threshold only matters"):
        PruneConfig(schedule="sensitivity", owl_threshold=3).validate()
    with pytest.raises(ConfigError, match="owl-lambda must be"):
        PruneConfig(schedule="owl", owl_lambda=0.7).validate()
    with pytest.raises(ConfigError, match="owl-threshold must be"):
        PruneConfig(schedule="owl", owl_threshold=0).validate()
    with pytest.raises(ConfigError, match="lower --owl-lambda"):  # a share below zero for the outlier-rich block
        _prune(sparsity=0.05, owl_lambda=0.4)
