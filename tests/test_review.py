"""Checks from the review in issue 11: every setting does what it claims, each against an independent computation."""

from __future__ import annotations

import pytest
import torch
from conftest import CharTokenizer, tiny_model

from daprune.api import prune
from daprune.config import FFN_CRITERIA, PruneConfig
from daprune.errors import ConfigError


def _prune(model, **kw):
    settings = dict(calibration="random", nsamples=8, seqlen=32, layers="1:-1", batch_size=4, progress=False)
    settings.update(kw)
    return prune(model=model, tokenizer=CharTokenizer(), **settings)


def _kept(report: dict) -> dict[int, list[int]]:
    return {int(i): list(c) for i, c in report["kept_channels"].items()}


# -- item 1: --ffn-criterion decides which channels go ------------------------------------------------------------
NON_DEFAULT = [c for c in FFN_CRITERIA if c != "second-moment"]


@pytest.fixture(scope="module")
def default_kept():
    torch.set_num_threads(1)
    return _kept(_prune(tiny_model(), sparsity=0.25, head_split="ffn-only").report)


@pytest.mark.parametrize("crit", NON_DEFAULT)
def test_every_ffn_criterion_changes_the_removed_channels(crit, default_kept, one_thread):
    """Under the default --selection auto a non-default criterion decides (score), so the kept set differs."""
    res = _prune(tiny_model(), sparsity=0.25, head_split="ffn-only", ffn_criterion=crit)
    kept = _kept(res.report)
    assert {r["plan"]["selection"] for r in res.report["layers"] if r["pruned"]} == {"score"}
    assert len(kept) == 4
    assert kept.keys() == default_kept.keys()
    differ = [i for i in kept if kept[i] != default_kept[i]]
    assert len(differ) >= len(kept) - 1, (crit, differ)  # not a coincidence in one block: (almost) every block


def test_l1_keeps_the_channels_with_the_largest_weight_sums(one_thread):
    """--ffn-criterion l1 alone: the kept channels are the top ones by sum |gate row| + |up row| + |down column|,
    computed here from the untouched model (no recovery, FFN-only split: nothing changes the FFN before scoring)."""
    ref = tiny_model()
    res = _prune(tiny_model(), sparsity=0.25, head_split="ffn-only", ffn_criterion="l1")
    for i, kept in _kept(res.report).items():
        mlp = ref.model.layers[i].mlp
        score = (mlp.gate_proj.weight.abs().sum(1) + mlp.up_proj.weight.abs().sum(1)
                 + mlp.down_proj.weight.abs().sum(0)).double()
        top = sorted(torch.topk(score, len(kept)).indices.tolist())
        assert kept == top, i


@pytest.mark.parametrize("selection", ["greedy", "obs"])
@pytest.mark.parametrize("crit", ["l1", "wanda-sp", "taylor-e1"])
def test_output_selection_with_another_criterion_is_refused(selection, crit):
    with pytest.raises(ConfigError, match="--selection score"):
        PruneConfig(ffn_criterion=crit, selection=selection).validate()


def test_default_criterion_keeps_greedy_and_obs():
    """The default (second-moment + auto) still means greedy/OBS; explicit rules pass through unchanged."""
    assert PruneConfig().ffn_selection() == "auto"
    assert PruneConfig(ffn_criterion="l1").ffn_selection() == "score"
    for rule in ("score", "greedy", "obs"):
        assert PruneConfig(selection=rule).ffn_selection() == rule
