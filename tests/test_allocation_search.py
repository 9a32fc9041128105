"""``--allocation-search``: the whole-model search that refines the sensitivity schedule's additive allocation.

Expected values are computed independently: the optimum of a synthetic non-additive cost by brute force over every
state, a state's KL by running the Hugging Face model with the trial blocks swapped in.
"""

from __future__ import annotations

import copy
import itertools
import math
import random

import pytest
import torch
from conftest import CharTokenizer, tiny_model
from test_allocation import SEQ, _ids, _pruner
from test_families import tiny as tiny_llama_like

import daprune
from daprune.allocation import KL_POSITIONS_STRIDE, sensitivity_targets
from daprune.allocation_search import ComposedKL, evolve, mutate, nearest_state
from daprune.config import PruneConfig
from daprune.errors import ConfigError
from daprune.models.adapter import get_adapter
from daprune.pipeline import BlockPruner
from daprune.stores import ResidentStore

pytestmark = pytest.mark.usefixtures("one_thread")

# five blocks, levels 0..4 removing 10 parameters each; budget 60: every valid state has six levels in all
PARAMS = [[0, 10, 20, 30, 40]] * 5
BUDGET, TOL = 60, 5
WEIGHTS = [1.0, 1.2, 3.0, 2.0, 4.0]


def _cost(state, _rows=None) -> float:
    """Convex per-block costs plus an interaction the additive rule cannot see: blocks 0 and 1 pruned together
    cost far more than apart."""
    return sum(w * lv**2 for w, lv in zip(WEIGHTS, state, strict=True)) + 6.0 * state[0] * state[1]


def test_mutation_moves_budget_between_blocks_and_keeps_the_total():
    rng = random.Random(0)
    state = (2, 1, 1, 1, 1)
    for _ in range(200):
        child = mutate(state, PARAMS, BUDGET, TOL, rng.choice((1, 2, 3)), rng)
        assert child is not None and child != state
        assert sum(p[lv] for p, lv in zip(PARAMS, child, strict=True)) == BUDGET
        assert all(0 <= lv < 5 for lv in child)
    # nothing can move: every block is at its largest size, or the only move leaves the budget
    assert mutate((4, 4), [[0, 10, 20, 30, 40]] * 2, 80, 5, 1, rng) is None
    assert mutate((1, 0), [[0, 10], [0, 25]], 10, 5, 1, rng) is None


def test_nearest_state_rounds_targets_to_levels_within_the_budget():
    assert nearest_state([12.0, 9.0, 11.0, 14.0, 16.0], PARAMS, BUDGET, TOL) == (1, 1, 1, 1, 2)
    assert nearest_state([0.0] * 5, PARAMS, BUDGET, TOL) is not None  # raised until the budget is met
    assert nearest_state([0.0, 0.0], [[0, 10], [0, 10]], 60, 5) is None  # the budget is out of reach


def test_search_finds_the_brute_force_optimum_the_additive_rule_misses():
    valid = [s for s in itertools.product(range(5), repeat=5) if sum(s) * 10 == BUDGET]
    best = min(valid, key=_cost)
    # the additive allocation: each block priced alone, budget to the cheapest marginal costs
    additive = min(valid, key=lambda s: sum(w * lv**2 for w, lv in zip(WEIGHTS, s, strict=True)))
    assert _cost(additive) > _cost(best)  # the interaction makes them differ
    adopted = []
    result = evolve({"additive": additive}, PARAMS, BUDGET, TOL, _cost, 4, 60, random.Random(0),
                    adopt=adopted.append)
    assert result.state == best and result.cost == _cost(best)
    assert result.starts == {"additive": _cost(additive)}
    assert adopted[0] == additive and adopted[-1] == best
    costs = [c for _, c in result.history]
    assert costs == sorted(costs, reverse=True) and len(costs) > 1  # every adopted parent was better


@torch.no_grad()
def test_composed_kl_equals_the_models_own_with_the_trial_blocks_swapped_in(monkeypatch):
    """The search's cost of a state is KL(dense || HF model with those trial blocks), also when it runs from the
    adopted parent's cached hidden states."""
    model = tiny_llama_like("llama", layers=4)
    adapter = get_adapter(model)
    for i in range(adapter.n_layers):
        adapter.block(i).to_canonical()
    cfg = PruneConfig(sparsity=0.2, channel_multiple=1, batch_size=4)
    n = 6
    ids = _ids(n)
    store = ResidentStore(adapter)
    blocks = range(adapter.n_layers)
    pruner = _pruner(cfg, 0.0, n)
    made: dict[int, list] = {}
    real_trial = BlockPruner.trial_block

    def keep(self, block, heads, removed, stats, rows=None):
        trial = real_trial(self, block, heads, removed, stats, rows)
        made.setdefault(block.index, []).append(trial)
        return trial

    monkeypatch.setattr(BlockPruner, "trial_block", keep)
    x = store.embed(ids, 4)
    contexts = store.layer_inputs(SEQ)
    budget = 0.2 * sum(p.numel() for i in blocks for p in adapter.block(i).layer.parameters())
    sensitivity_targets(adapter, pruner, x, contexts, blocks, budget, 2)

    def log_probs(h):
        return torch.log_softmax(adapter.logits(h[:, ::KL_POSITIONS_STRIDE]).float(), -1)

    levels = {i: [None] + made[i] for i in blocks}
    kl = ComposedKL(adapter.block, adapter.n_layers, contexts, levels, x, log_probs, 4)
    parent, child = (1, 0, 2, 0), (1, 0, 1, 3)
    kl.adopt(parent)
    got = {s: kl(s, n) for s in (parent, child)}
    got_few = kl(child, 2)
    for i in range(adapter.n_layers):
        adapter.block(i).to_native()
    dense = torch.log_softmax(model(input_ids=ids, use_cache=False).logits[:, ::KL_POSITIONS_STRIDE], -1)
    for state, value in list(got.items()) + [("few", got_few)]:
        rows = 2 if state == "few" else n
        s = child if state == "few" else state
        swapped = copy.deepcopy(model)
        for i, level in zip(blocks, s, strict=True):
            if level:
                trial = copy.deepcopy(made[i][level - 1])
                trial.to_native()
                get_adapter(swapped).layers()[i] = trial.layer
        lp = torch.log_softmax(swapped(input_ids=ids[:rows], use_cache=False).logits[:, ::KL_POSITIONS_STRIDE], -1)
        want = torch.nn.functional.kl_div(lp, dense[:rows], log_target=True, reduction="none").sum(-1).mean()
        assert math.isclose(value, float(want), rel_tol=1e-3, abs_tol=1e-7), (state, value, float(want))


def _prune(model, **kw):
    settings = dict(sparsity=0.25, calibration="random", nsamples=8, seqlen=SEQ, batch_size=4, progress=False,
                    channel_multiple=1, schedule="sensitivity", allocation_search=6, search_nsamples=4)
    settings.update(kw)
    return daprune.prune(model=model, tokenizer=CharTokenizer(), **settings)


def test_search_prunes_by_its_shares_and_reports_what_it_found():
    from daprune.report import summary

    rep = _prune(tiny_llama_like("llama", layers=6)).report
    alloc = rep["allocation"]
    search = alloc["search"]
    budget = 0.25 * rep["params"]["before"]
    assert math.isclose(sum(alloc["targets"].values()), budget)
    assert math.isclose(sum(alloc["additive_targets"].values()), budget)
    assert search["cost"] < min(search["start_costs"].values())  # it found a better state than either start
    assert alloc["targets"] != alloc["additive_targets"]
    assert search["generations"] == 6 and search["nsamples"] == 4
    assert alloc["size_multiples"] == [0.5, 1.0, 1.5, 2.0, 2.5, 3.0]
    for row in rep["layers"]:
        t = alloc["targets"][str(row["index"])]
        assert (row["plan"]["params"] >= t) if t else not row["pruned"]
    assert "search KL" in summary(rep)
    plain = _prune(tiny_llama_like("llama", layers=6), allocation_search=None, search_nsamples=None).report
    assert [r["kept_channels"] for r in plain["layers"]] != [r["kept_channels"] for r in rep["layers"]]
    again = _prune(tiny_llama_like("llama", layers=6)).report  # the seed makes the search reproducible
    assert again["allocation"]["targets"] == alloc["targets"]
    assert [r["kept_channels"] for r in again["layers"]] == [r["kept_channels"] for r in rep["layers"]]


def test_settings_the_search_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match="needs --schedule sensitivity"):
        PruneConfig(allocation_search=10).validate()
    with pytest.raises(ConfigError, match=">= 1 generation"):
        PruneConfig(schedule="sensitivity", allocation_search=0).validate()
    with pytest.raises(ConfigError, match="only matters with --allocation-search"):
        PruneConfig(schedule="sensitivity", search_nsamples=8).validate()
    with pytest.raises(ConfigError, match="search-nsamples must be"):
        PruneConfig(schedule="sensitivity", allocation_search=2, search_nsamples=0).validate()


def test_streaming_search_equals_in_memory(tmp_path):
    """Under --streaming the search loads each dense block on access and keeps only the trial copies."""
    from transformers import AutoModelForCausalLM

    tiny_model("llama", layers=4, heads=4, kv=2).save_pretrained(tmp_path / "src")
    streamed = _prune(str(tmp_path / "src"), out=str(tmp_path / "o"), streaming=True).report
    in_memory = _prune(AutoModelForCausalLM.from_pretrained(tmp_path / "src")).report
    assert streamed["allocation"]["search"]["cost"] == pytest.approx(in_memory["allocation"]["search"]["cost"],
                                                                     rel=1e-5)
    assert streamed["allocation"]["targets"] == in_memory["allocation"]["targets"]
    assert [r["kept_channels"] for r in streamed["layers"]] == [r["kept_channels"] for r in in_memory["layers"]]
