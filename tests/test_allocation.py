"""``--schedule sensitivity``: measured per-block costs, the allocation that minimises their sum, end to end.

Expected values are computed independently: logits by the model's own forward, each trial's KL by running the
whole model with the trial block swapped in, the allocation by brute force over every split of the budget.
"""

from __future__ import annotations

import copy
import itertools
import math

import pytest
import torch
from conftest import CharTokenizer, tiny_model
from test_families import FAMILIES as LLAMA_LIKE
from test_families import tiny as tiny_llama_like
from test_families_extra import FAMILIES as OTHERS
from test_families_extra import tiny as tiny_other

import daprune
from daprune.allocation import KL_POSITIONS_STRIDE, Curve, allocate, lower_hull, sensitivity_targets
from daprune.config import PruneConfig
from daprune.criteria.base import get_criterion
from daprune.criteria.similarity import select_head_plan
from daprune.errors import ConfigError
from daprune.models.adapter import get_adapter
from daprune.pipeline import BlockPruner, BlockRecord
from daprune.schedule import BlockPlan
from daprune.stores import ResidentStore

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 24


def _ids(n: int, vocab: int = 128) -> torch.Tensor:
    return torch.randint(3, vocab, (n, SEQ), generator=torch.Generator().manual_seed(3))


# -- the adapter's logits are the model's own -------------------------------------------------------------------
@pytest.mark.parametrize("family", LLAMA_LIKE + OTHERS)
@torch.no_grad()
def test_logits_from_the_last_hidden_state_equal_the_models(family):
    model = tiny_llama_like(family) if family in LLAMA_LIKE else tiny_other(family)
    adapter = get_adapter(model)
    got = {}

    def grab(_m, _a, out):
        got["h"] = out[0] if isinstance(out, tuple) else out

    handle = adapter.layers()[-1].register_forward_hook(grab)
    try:
        want = model(input_ids=_ids(2), use_cache=False).logits
    finally:
        handle.remove()
    torch.testing.assert_close(adapter.logits(got["h"]), want, rtol=1e-5, atol=1e-5)


# -- the allocation -----------------------------------------------------------------------------------------------
def test_lower_hull_drops_points_above_the_chord():
    pts = [(0, 0), (1, 5), (2, 2), (3, 4), (4, 10), (5, 16)]  # (5, 16) lies on the last chord's extension
    assert lower_hull(pts) == [(0, 0), (2, 2), (3, 4), (5, 16)]


def _interp(hull, x):
    for (x1, y1), (x2, y2) in itertools.pairwise(hull):
        if x1 <= x <= x2:
            return y1 + (y2 - y1) * (x - x1) / (x2 - x1)
    raise AssertionError(x)


def test_allocation_is_the_least_total_cost_split_of_the_budget():
    """Brute force over every integer split of the budget (costs between measured sizes interpolated on each
    block's lower hull, the allocation's own model of a block): none costs less than the allocation."""
    curves = [Curve(0, [2, 4, 6], [1.0, 5.0, 12.0]),  # convex
              Curve(1, [2, 4, 6], [3.0, 3.5, 9.0]),  # a cheap second step: its hull skips the first point
              Curve(2, [3, 6], [0.3, 8.0])]
    hulls = {c.block: lower_hull([(0.0, 0.0)] + list(zip(map(float, c.params), c.kl, strict=True))) for c in curves}
    for budget in range(1, 18):
        got = allocate(curves, budget)
        assert math.isclose(sum(got.values()), budget)
        cost = sum(_interp(hulls[b], t) for b, t in got.items())
        best = min(sum(_interp(hulls[b], t) for b, t in zip((0, 1, 2), split, strict=True))
                   for split in itertools.product(range(7), range(7), range(7)) if sum(split) == budget)
        assert cost <= best + 1e-9, budget


def test_allocation_refuses_a_budget_beyond_the_measured_sizes():
    with pytest.raises(ConfigError, match="sensitivity"):
        allocate([Curve(0, [2, 4], [1.0, 2.0])], 5)


# -- the measurement ------------------------------------------------------------------------------------------------
def _pruner(cfg: PruneConfig, target: float, nsamples: int) -> BlockPruner:
    pruner = BlockPruner(cfg, get_criterion(cfg.ffn_criterion), get_criterion("second-moment"), target)
    pruner.n_score = pruner.n_fit = nsamples
    pruner.ntokens = nsamples * SEQ
    return pruner


@pytest.mark.parametrize(("family", "refit"), [("gemma3_text", False), ("gpt2", False), ("llama", True),
                                               ("gemma3_text", True)])
@torch.no_grad()
def test_each_measured_kl_is_the_whole_models_with_that_trial_block(family, refit, monkeypatch):
    """Every (block, size) point: KL(dense || model with that trial block swapped in), both from full forwards;
    with ``refit`` the trial blocks are the re-fitted ones (held-out rows choosing the strength)."""
    model = tiny_llama_like(family) if family in LLAMA_LIKE else tiny_other(family)
    adapter = get_adapter(model)
    for i in range(adapter.n_layers):
        adapter.block(i).to_canonical()
    cfg = PruneConfig(sparsity=0.2, channel_multiple=1, batch_size=4,
                      **({"recovery": "heldout", "recovery_target": "block"} if refit else {}))
    n, ns = 8, 3
    ids = _ids(n + 4)
    store = ResidentStore(adapter)
    blocks = range(1, adapter.n_layers)
    pruner = _pruner(cfg, 0.0, n)
    made = []
    real_trial = BlockPruner.trial_block

    def keep(self, block, heads, removed, stats, rows=None):
        assert (rows is not None) == refit
        trial = real_trial(self, block, heads, removed, stats, rows)
        made.append((block.index, trial))
        return trial

    monkeypatch.setattr(BlockPruner, "trial_block", keep)
    budget = 0.15 * sum(p.numel() for i in blocks for p in adapter.block(i).layer.parameters())
    x = store.embed(ids, 4)
    targets, entry = sensitivity_targets(adapter, pruner, x[:n], store.layer_inputs(SEQ), blocks, budget, ns,
                                         refit=refit, heldout=x[n:])
    assert entry["refit"] is refit and entry["refit_heldout_rows"] == (4 if refit else 0)
    for i in range(adapter.n_layers):
        adapter.block(i).to_native()
    dense = torch.log_softmax(model(input_ids=ids[:ns], use_cache=False).logits[:, ::KL_POSITIONS_STRIDE], -1)
    seen = {i: 0 for i in blocks}
    assert len(made) == sum(len(c["kl"]) for c in entry["curves"].values()) > len(blocks)
    for i, trial in made:
        trial.to_native()
        swapped = copy.deepcopy(model)
        get_adapter(swapped).layers()[i] = trial.layer
        lp = torch.log_softmax(swapped(input_ids=ids[:ns], use_cache=False).logits[:, ::KL_POSITIONS_STRIDE], -1)
        want = torch.nn.functional.kl_div(lp, dense, log_target=True, reduction="none").sum(-1).mean()
        got = entry["curves"][str(i)]["kl"][seen[i]]
        assert math.isclose(got, float(want), rel_tol=1e-3, abs_tol=1e-7), (i, got, float(want))
        seen[i] += 1
    assert math.isclose(sum(targets.values()), budget)


# -- --sensitivity-refit: the trial block is the block the pipeline makes -------------------------------------------
def _plan_pruner(cfg: PruneConfig, plan, n: int) -> BlockPruner:
    pruner = _pruner(cfg, 0.0, n)
    pruner.plans = {1: plan}
    return pruner


def _block_one(family: str, rows: int, batch_size: int) -> tuple:
    """Block 1 of a tiny model in canonical form, a held-out block-target re-fit config, ``rows`` embedded rows
    and the block's context."""
    adapter = get_adapter(tiny_llama_like(family))
    block = adapter.block(1)
    block.to_canonical()
    cfg = PruneConfig(sparsity=0.2, channel_multiple=1, batch_size=batch_size, recovery="heldout",
                      recovery_target="block")
    store = ResidentStore(adapter)
    return block, cfg, store.embed(_ids(rows), batch_size), store.layer_inputs(SEQ)[1]


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
@pytest.mark.parametrize("part", ["heads", "channels"])
@torch.no_grad()
def test_a_refitted_trial_equals_the_pipelines_prune_on_dense_inputs(family, part):
    """On the dense stream, ``trial_block`` with rows gives the weights ``BlockPruner.prune`` (the pipeline's own
    code path) gives the block for the same plan: heads only (o_proj re-fit) or channels only (down_proj re-fit,
    held-out choice judged on the real block output)."""
    n = 8
    block, cfg, x, ctx = _block_one(family, n + 4, 4)
    yd = block.forward(x, ctx)
    plan = BlockPlan(1, 0, 0) if part == "heads" else BlockPlan(0, block.n_channels // 4, 0)
    pruner = _plan_pruner(cfg, plan, n)
    stats, head_imp, redundant = pruner.dense_statistics(block, x[:n], ctx, BlockRecord(1, True))
    heads = (select_head_plan(block.head_groups(), 1, 0, head_imp, redundant)
             if part == "heads" else [])
    removed = pruner.ffn_ranking(block, stats, plan.channels)[: plan.channels].tolist()
    rows = pruner.refit_rows(block, x, yd, ctx, n)
    trial = pruner.trial_block(block, heads, removed, stats, rows)
    plain = pruner.trial_block(block, heads, removed, stats)

    pruned = copy.deepcopy(block)
    rec = pruner.prune(pruned, block, x, x, yd, ctx)
    assert rec.kept_heads == [h for h in range(block.n_heads) if h not in heads]
    assert rec.kept_channels == trial.n_channels
    for got, want in zip(trial.layer.parameters(), pruned.layer.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert not all(torch.equal(a, b) for a, b in zip(trial.layer.parameters(), plain.layer.parameters(), strict=True))


def test_the_refit_lowers_the_trials_error_on_rows_it_never_saw():
    """A trial losing a head per group and half its channels, 32 fit rows (8 held out): its block output error on
    16 further rows is lower with the re-fit (o_proj for the heads, down_proj toward the block output, which also
    absorbs what the heads took) than with OBS compensation alone (errors from the blocks' own forwards). Channels
    alone gain nothing on dense inputs: OBS already is the kept columns' least-squares fit to the same target."""
    n = 32
    block, cfg, x, ctx = _block_one("llama", n + 8 + 16, 8)
    with torch.no_grad():
        yd = block.forward(x, ctx)
        pruner = _plan_pruner(cfg, BlockPlan(1, block.n_channels // 2, 0), n)
        assert pruner.selection(block) == "obs"
        stats, head_imp, redundant = pruner.dense_statistics(block, x[:n], ctx, BlockRecord(1, True))
        heads = select_head_plan(block.head_groups(), 1, 0, head_imp, redundant)
        removed = pruner.ffn_ranking(block, stats, block.n_channels // 2)[: block.n_channels // 2].tolist()
        rows = pruner.refit_rows(block, x[: n + 8], yd[: n + 8], ctx, n)
        fitted = pruner.trial_block(block, heads, removed, stats, rows)
        plain = pruner.trial_block(block, heads, removed, stats)
        unseen = slice(n + 8, None)
        err = {name: float((b.forward(x[unseen], ctx) - yd[unseen]).pow(2).sum())
               for name, b in (("fitted", fitted), ("plain", plain))}
    assert err["fitted"] < 0.95 * err["plain"], err


def test_the_refit_changes_the_measured_curves_and_the_allocation():
    kw = dict(recovery="heldout", recovery_target="block", heldout_nsamples=4, nsamples=16)
    plain = _prune(tiny_llama_like("llama", layers=6), **kw).report["allocation"]
    fitted = _prune(tiny_llama_like("llama", layers=6), sensitivity_refit=True, **kw).report["allocation"]
    assert fitted["refit"] and not plain["refit"] and fitted["refit_heldout_rows"] == 4
    assert fitted["curves"] != plain["curves"]
    # a re-fit chosen on held-out rows never makes the block worse there; on the KL rows it lowers the cost overall
    assert sum(sum(c["kl"]) for c in fitted["curves"].values()) < sum(sum(c["kl"]) for c in plain["curves"].values())


# -- end to end -----------------------------------------------------------------------------------------------------
def _prune(model, **kw):
    settings = dict(sparsity=0.25, calibration="random", nsamples=8, seqlen=SEQ, batch_size=4, progress=False,
                    channel_multiple=1, schedule="sensitivity")
    settings.update(kw)
    return daprune.prune(model=model, tokenizer=CharTokenizer(), **settings)


def test_sensitivity_schedule_prunes_every_block_by_its_share(tmp_path):
    from daprune.report import plot_allocation, summary

    model = tiny_llama_like("llama", layers=6)
    dense_state = copy.deepcopy(model.state_dict())
    rep = _prune(model).report
    alloc = rep["allocation"]
    assert sorted(alloc["curves"], key=int) == [str(i) for i in range(6)]  # every block is a candidate
    budget = 0.25 * rep["params"]["before"]
    assert math.isclose(sum(alloc["targets"].values()), budget)
    removed = 0
    for row in rep["layers"]:
        t = alloc["targets"][str(row["index"])]
        if t == 0:  # a block given no share stays exactly as it was
            assert not row["pruned"]
            prefix = f"model.layers.{row['index']}."
            assert all(torch.equal(v, dense_state[k]) for k, v in model.state_dict().items() if k.startswith(prefix))
        else:
            assert row["pruned"] and row["plan"]["params"] >= t
            removed += row["plan"]["params"]
    assert removed == rep["params"]["removed"] >= budget
    assert len({round(t) for t in alloc["targets"].values()}) > 1  # shares differ: not the uniform rule
    assert "allocation     sensitivity" in summary(rep)
    pytest.importorskip("matplotlib")
    assert plot_allocation(alloc, tmp_path / "allocation.png").stat().st_size > 1000


def test_the_sensitivity_pass_shows_progress_only_when_asked(capsys):
    """The pass runs every candidate block at every size (minutes on a real model): it gets its own progress bar,
    which ``progress=False`` (``--quiet``) hides; the bar changes nothing that is measured."""
    quiet = _prune(tiny_llama_like("llama", layers=6)).report["allocation"]
    assert "measuring sensitivity" not in capsys.readouterr().err
    shown = _prune(tiny_llama_like("llama", layers=6), progress=True).report["allocation"]
    assert "measuring sensitivity" in capsys.readouterr().err
    assert shown["curves"] == quiet["curves"] and shown["targets"] == quiet["targets"]


def test_sensitivity_changes_what_is_removed():
    uniform = _prune(tiny_llama_like("llama", layers=6), schedule="uniform", layers="0:").report
    sens = _prune(tiny_llama_like("llama", layers=6)).report
    assert [r["kept_channels"] for r in uniform["layers"]] != [r["kept_channels"] for r in sens["layers"]]


def test_the_size_grid_sets_the_points_each_block_is_measured_at():
    """``--sensitivity-sizes``: a coarser grid measures a subset of the default's points (same plan, same KL, since
    a trial depends only on its size); a finer one adds points the default never measures, and moves the shares."""
    default = _prune(tiny_llama_like("llama", layers=6)).report["allocation"]
    coarse = _prune(tiny_llama_like("llama", layers=6), sensitivity_sizes="0.5,1,2").report["allocation"]
    fine = _prune(tiny_llama_like("llama", layers=6), sensitivity_sizes="0.25,0.5,0.75,1,1.25,1.5,2,2.5,3"
                  ).report["allocation"]
    assert default["size_multiples"] == [0.5, 1.0, 1.5, 2.0, 3.0] and coarse["size_multiples"] == [0.5, 1.0, 2.0]
    new_points = 0
    for b, c in default["curves"].items():
        measured = dict(zip(c["params"], c["kl"], strict=True))
        assert 0 < len(coarse["curves"][b]["params"]) < len(c["params"])
        for p, kl in zip(coarse["curves"][b]["params"], coarse["curves"][b]["kl"], strict=True):
            assert kl == pytest.approx(measured[p], rel=1e-6)
        assert set(measured) <= set(fine["curves"][b]["params"])  # the fine grid holds every default size
        new_points += len(set(fine["curves"][b]["params"]) - set(measured))
    assert new_points >= 6
    assert fine["targets"] != default["targets"]
    for t in (coarse, fine):
        assert math.isclose(sum(t["targets"].values()), default["budget"])


def test_streaming_with_a_tied_head_equals_in_memory(tmp_path):
    """The KL reads the LM head; in streaming mode a tied head must see the real embedding, not the skeleton's."""
    from transformers import AutoModelForCausalLM

    tiny_model(layers=4, heads=4, tie=True).save_pretrained(tmp_path / "src")
    streamed = _prune(str(tmp_path / "src"), out=str(tmp_path / "o"), streaming=True).report
    in_memory = _prune(AutoModelForCausalLM.from_pretrained(tmp_path / "src")).report
    assert streamed["allocation"]["curves"] == in_memory["allocation"]["curves"]
    assert [r["kept_channels"] for r in streamed["layers"]] == [r["kept_channels"] for r in in_memory["layers"]]


def test_settings_the_schedule_cannot_honour_are_refused():
    with pytest.raises(ConfigError, match="sensitivity-nsamples"):
        PruneConfig(sensitivity_nsamples=4).validate()
    with pytest.raises(ConfigError, match="sensitivity-sizes only matters"):
        PruneConfig(sensitivity_sizes="0.5,1").validate()
    for bad in ("1,0.5", "0,1", "1,1", "a,b", "1,nan", ""):
        with pytest.raises(ConfigError, match="--sensitivity-sizes must"):
            PruneConfig(schedule="sensitivity", sensitivity_sizes=bad).validate()
    with pytest.raises(ConfigError, match="allocation-search"):
        PruneConfig(schedule="sensitivity", sensitivity_sizes="1,2", allocation_search=2).validate()
    PruneConfig(schedule="sensitivity", sensitivity_sizes="0.25,1,4").validate()
    with pytest.raises(ConfigError, match="sensitivity-refit only matters"):
        PruneConfig(sensitivity_refit=True, recovery="post").validate()
    with pytest.raises(ConfigError, match="--recovery post or heldout"):
        PruneConfig(schedule="sensitivity", sensitivity_refit=True).validate()
    PruneConfig(schedule="sensitivity", sensitivity_refit=True, recovery="post").validate()
    with pytest.raises(ConfigError, match="layout uniform"):
        PruneConfig(schedule="sensitivity", layout="uniform").validate()
    assert PruneConfig(schedule="sensitivity").block_range(10) == range(10)
    assert PruneConfig().block_range(10) == range(4, 8)
