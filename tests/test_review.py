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


# -- item 4: centred moments on high-mean channels -----------------------------------------------------------------
def _reference_cov(x: torch.Tensor) -> torch.Tensor:
    """Two-pass float64 population covariance, written out independently of Moments."""
    x = x.double()
    xc = x - x.sum(0) / x.shape[0]
    return xc.T @ xc / x.shape[0]


def test_covariance_of_a_high_mean_channel_matches_float64():
    """A channel of mean 1e4 and std 1 next to ordinary ones, fed in uneven batches: fp32 E[xx^T] - mm^T
    would lose the variance entirely (E[x^2] = 1e8 has a resolution of 8 in fp32)."""
    from daprune.stats import Moments

    g = torch.Generator().manual_seed(0)
    x = torch.randn(3000, 5, generator=g, dtype=torch.float64)
    x[:, 0] = 1e4 + x[:, 0]
    x[:, 1] = -3e3 + 2 * x[:, 1] + 0.5 * x[:, 0]  # high mean too, and correlated with channel 0
    x32 = x.float()  # what the model hands over; the reference sees the same fp32 values
    mom = Moments("high-mean")
    for a, b in [(0, 1), (1, 700), (700, 701), (701, 2048), (2048, 3000)]:
        mom.update(x32[a:b])
    ref = _reference_cov(x32)
    torch.testing.assert_close(mom.cov.double(), ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(mom.var.double(), torch.diagonal(ref), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(mom.mean.double(), x32.double().mean(0), rtol=1e-6, atol=1e-3)
    naive = mom.second - torch.outer(mom.mean, mom.mean)  # the old formula: wrong by far more than the tolerance
    assert abs(float(naive[0, 0]) - float(ref[0, 0])) > 0.05


def test_variance_only_moments_refuse_the_full_covariance():
    from daprune.errors import NumericalError
    from daprune.stats import Moments

    mom = Moments("diag", full_cov=False)
    mom.update(torch.tensor([[1.0, 2.0], [3.0, 6.0]]))
    torch.testing.assert_close(mom.var, torch.tensor([1.0, 4.0]))
    with pytest.raises(NumericalError, match="full covariance"):
        _ = mom.cov


# -- item 3: OBS chunks never take both halves of a duplicate pair -------------------------------------------------
def _duplicate_pairs_problem(pairs: int = 40, single: int = 80, out: int = 24, tokens: int = 4000):
    """Activations and down_proj columns where channel 2i+1 is an exact copy of channel 2i (same input, same
    column): either alone is free to remove (the twin takes over its output), both together are not."""
    g = torch.Generator().manual_seed(3)
    base = torch.randn(tokens, pairs + single, generator=g, dtype=torch.float64)
    h = torch.cat([base[:, :pairs].repeat_interleave(2, 1), base[:, pairs:]], 1)
    dcols = torch.randn(out, pairs + single, generator=g, dtype=torch.float64)
    d = torch.cat([dcols[:, :pairs].repeat_interleave(2, 1), dcols[:, pairs:]], 1)
    return h, d


def _compensated_residual(h: torch.Tensor, d: torch.Tensor, removed: list[int]) -> float:
    """Relative output error after the best least-squares re-fit of the kept columns (numpy-free lstsq)."""
    keep = [i for i in range(h.shape[1]) if i not in set(removed)]
    y = h @ d.T
    w = torch.linalg.lstsq(h[:, keep], y).solution
    return float((h[:, keep] @ w - y).norm() / y.norm())


def test_obs_removes_only_one_of_each_duplicate_pair():
    from daprune.selection import obs_order

    h, d = _duplicate_pairs_problem()
    second = (h.T @ h / h.shape[0]).float()
    count = 40  # > steps: chunks of 2, so the old top-k chunk took a pair's two identical costs together
    order, w = obs_order(d.float(), second, count, damp=1e-6)
    assert len(set(order)) == count
    pairs_hit = [c // 2 for c in order]
    assert all(c < 80 for c in order), "only duplicates are free"
    assert len(set(pairs_hit)) == count, "both halves of a pair removed"
    assert _compensated_residual(h, d, order) < 1e-6  # every removed channel's twin carries its output
    both = [0, 1] + list(range(2, 2 * (count - 1), 2))  # what removing a whole pair would cost, for scale
    assert _compensated_residual(h, d, both) > 0.05


def test_obs_chunk_is_sequential_obs_within_its_pool():
    """With one chunk for everything, the picks equal one-at-a-time OBS (steps=count) on a random problem."""
    from daprune.selection import obs_order

    g = torch.Generator().manual_seed(5)
    h = torch.randn(500, 30, generator=g)
    h[:, 7] = h[:, 3] + 0.01 * torch.randn(500, generator=g)
    d = torch.randn(6, 30, generator=g)
    second = h.T @ h / 500
    one_by_one, w1 = obs_order(d, second, 5, damp=1e-4, steps=5)
    chunked, w2 = obs_order(d, second, 5, damp=1e-4, steps=1)
    assert chunked == one_by_one
    torch.testing.assert_close(w1, w2, rtol=1e-4, atol=1e-5)


# -- item 2: per-block errors on held-out calibration rows ---------------------------------------------------------
def _state_hash(model) -> str:
    import hashlib

    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@pytest.mark.parametrize("kw", [dict(recovery="paper"), dict(nsamples=16), dict(nsamples=6, recovery="post")])
def test_heldout_rows_change_nothing_but_the_report(kw, one_thread):
    """Held-out rows ride along in both streams but no statistic sees them: same kept channels, same weights,
    same fit-row errors (nsamples=6 with batch 4: the last fit batch is partial, the held-out rows start a new one)."""
    plain = _prune(tiny_model(), sparsity=0.25, **kw)
    held = _prune(tiny_model(), sparsity=0.25, heldout_nsamples=3, **kw)
    assert _state_hash(plain.model) == _state_hash(held.model)
    assert plain.report["kept_channels"] == held.report["kept_channels"]
    for a, b in zip(plain.report["layers"], held.report["layers"], strict=True):
        assert (a["kept_heads"], a["error"], a["error_no_recovery"]) == (b["kept_heads"], b["error"],
                                                                          b["error_no_recovery"])
        assert a["error_heldout"] is None
        assert b["error_heldout"] is not None or not b["pruned"]
    assert held.report["calibration"]["heldout"]["nsamples"] == 3


def test_heldout_error_shows_the_refit_overfit(one_thread):
    """The paper's re-fit on 2 x 32 tokens (fewer than the 96-wide FFN: underdetermined least squares) lowers
    every block's error on its own rows and raises it on held-out rows; with 48 x 32 tokens the same re-fit
    lowers the held-out error too. Only the held-out columns tell the two apart."""
    few = _prune(tiny_model(), sparsity=0.25, recovery="paper", nsamples=2, heldout_nsamples=4)
    rows = [r for r in few.report["layers"] if r["pruned"]]
    assert len(rows) == 4
    for r in rows:
        assert r["error"] < r["error_no_recovery"], r  # what the fit-row errors alone report: recovery helps
        assert r["error_heldout"] > r["error_no_recovery_heldout"], r  # it hurts on rows it did not see
    many = _prune(tiny_model(), sparsity=0.25, recovery="paper", nsamples=48, heldout_nsamples=8)
    for r in (r for r in many.report["layers"] if r["pruned"]):
        assert r["error_heldout"] < r["error_no_recovery_heldout"], r


def test_summary_table_shows_heldout_columns(one_thread):
    from daprune.report import layer_table

    res = _prune(tiny_model(), sparsity=0.25, recovery="paper", heldout_nsamples=2)
    table = layer_table(res.report["layers"])
    assert "out held-out" in table.splitlines()[0] and "no-rec held-out" in table.splitlines()[0]
    first = next(r for r in res.report["layers"] if r["pruned"])
    assert f"{first['error_heldout']:.4g}" in table.splitlines()[2]
    assert "held-out" not in layer_table(_prune(tiny_model(), sparsity=0.25).report["layers"])


# -- item 5: the head/FFN split measured on the real block -------------------------------------------------------
def _block_setup(rows: int = 4, seqlen: int = 16):
    from daprune.models.adapter import get_adapter
    from daprune.stores import ResidentStore

    model = tiny_model()
    adapter = get_adapter(model)
    x = torch.randn(rows, seqlen, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    ctx = ResidentStore(adapter).layer_inputs(seqlen)[1]
    return adapter.block(1), x, ctx


def test_measured_split_error_equals_the_masked_block(one_thread):
    """measure_plan (slice a copy) == E||masked(x) - y||^2 with the same heads' o columns and channels' down
    columns zeroed in an independent copy, computed in float64 here."""
    import copy

    from daprune.config import PruneConfig
    from daprune.criteria.base import get_criterion
    from daprune.pipeline import BlockPruner
    from daprune.stats import BlockStats

    block, x, ctx = _block_setup()
    with torch.no_grad():
        y = block.forward(x, ctx) + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        pruner = BlockPruner(PruneConfig(selection="greedy"), get_criterion("second-moment"),
                             get_criterion("second-moment"), 0.0)
        heads, removed = [1, 4], [0, 5, 7, 50, 95]  # one query head of each KV group (6 heads, 2 groups)
        got = pruner.measure_plan(block, heads, removed, BlockStats(), x, y, ctx)
        masked = type(block)(copy.deepcopy(block.layer), block.index)
        hd = masked.head_dim
        for h in heads:
            masked.attn_out().weight[:, h * hd : (h + 1) * hd] = 0
        masked.ffn_out().weight[:, removed] = 0
        want = (masked.forward(x, ctx).double() - y.double()).pow(2).sum(-1).mean()
    assert got == pytest.approx(float(want), rel=1e-4)
    assert block.n_heads == 6 and block.n_channels == 96  # the trial worked on a copy


def test_compensation_equals_least_squares_on_the_kept_columns():
    from daprune.block_ops import compensate

    g = torch.Generator().manual_seed(4)
    h = torch.randn(400, 12, generator=g, dtype=torch.float64)
    d = torch.randn(5, 12, generator=g, dtype=torch.float64)
    keep = [0, 2, 3, 5, 8, 9, 11]
    w = compensate(d.float(), (h.T @ h / 400).float(), keep, damp=1e-10)
    ref = torch.linalg.lstsq(h[:, keep], h @ d.T).solution.T
    torch.testing.assert_close(w[:, keep].double(), ref, rtol=1e-3, atol=1e-4)
    assert w[:, [1, 4, 6, 7, 10]].abs().max() == 0


@pytest.mark.parametrize("nsamples", [8, 16])  # greedy / obs selection under auto
def test_measured_split_picks_the_least_real_error(nsamples, one_thread):
    res = _prune(tiny_model(), sparsity=0.3, head_split="measured", nsamples=nsamples)
    for r in (r for r in res.report["layers"] if r["pruned"]):
        cands = r["split_errors"]
        assert len(cands) >= 2 and all({"estimate", "measured"} <= c.keys() for c in cands.values())
        best = min(cands, key=lambda k: cands[k]["measured"])
        assert int(best) == r["plan"]["heads_per_group"], (r["index"], cands)
    first = next(r for r in res.report["layers"] if r["pruned"])
    assert first["error_input"] == 0  # same input in both streams: without heads the estimate is exact (greedy)
    if nsamples == 8:
        assert first["split_errors"]["0"]["measured"] == pytest.approx(first["split_errors"]["0"]["estimate"], rel=1e-3)


def test_estimate_ranks_some_splits_differently_from_the_real_error(one_thread):
    """Why ``measured`` exists: when heads are cheap (o_proj scaled by 0.1) the estimate, which adds attention and
    FFN errors as if independent and ignores OBS compensation, picks a different split than the real block
    output error in some blocks (on ordinary tiny models, where heads are dear, both always keep every head)."""
    model = tiny_model()
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.mul_(0.1)
    res = _prune(model, sparsity=0.3, head_split="measured", nsamples=16, layers="0:6")
    differ = 0
    for r in (r for r in res.report["layers"] if r["pruned"]):
        c = r["split_errors"]
        by_estimate, by_real = (min(c, key=lambda k, f=f: c[k][f]) for f in ("estimate", "measured"))
        differ += by_estimate != by_real
    assert differ >= 1


def test_greedy_order_reused_only_for_the_same_statistics_and_weight(monkeypatch):
    """The split decision's greedy order serves the prune of the same block (a prefix: every prefix of a greedy
    order is the greedy order for that count), but new moments or a changed down_proj weight recompute it."""
    from daprune import pipeline
    from daprune.config import PruneConfig
    from daprune.criteria.base import get_criterion
    from daprune.selection import greedy_order
    from daprune.stats import Moments

    block, _, _ = _block_setup()
    g = torch.Generator().manual_seed(3)
    moments = Moments("down_in", full_cov=False)
    moments.update(torch.randn(300, block.n_channels, generator=g))
    calls = []
    monkeypatch.setattr(pipeline, "greedy_order", lambda *a: calls.append(a[2]) or greedy_order(*a))
    pruner = pipeline.BlockPruner(PruneConfig(selection="greedy"), get_criterion("second-moment"), None, 0.0)
    w = block.ffn_out().weight.float()
    most = pruner.greedy(block, moments, 40)
    assert most == greedy_order(w, moments.second, 40)
    assert pruner.greedy(block, moments, 25) == greedy_order(w, moments.second, 25) == most[:25]
    assert calls == [40]  # the second answer came from the first
    other = Moments("down_in", full_cov=False)
    other.update(torch.randn(300, block.n_channels, generator=g))
    assert pruner.greedy(block, other, 25) == greedy_order(w, other.second, 25) and calls == [40, 25]
    with torch.no_grad():
        block.ffn_out().weight.mul_(torch.rand(block.ffn_out().weight.shape, generator=g))
    assert pruner.greedy(block, other, 20) == greedy_order(block.ffn_out().weight.float(), other.second, 20)
    assert calls == [40, 25, 20]
    assert pruner.greedy(block, other, 30) and calls == [40, 25, 20, 30]  # more than the memo holds


def test_compensate_heads_keeps_the_choices_and_lowers_heldout_error(one_thread):
    """--compensate-heads only re-fits the kept o_proj columns: the first pruned block (same input in both runs)
    keeps the same heads and channels, its o_proj changes, and its output error on held-out calibration rows,
    which no statistic saw, drops."""
    kw = dict(sparsity=0.3, head_split="paper", nsamples=32, heldout_nsamples=16, layers="1:-1")
    runs = {}
    for on in (False, True):
        model = tiny_model()
        runs[on] = (model, _prune(model, compensate_heads=on, **kw).report)
    (m0, plain), (m1, comp) = runs[False], runs[True]
    first = [next(r for r in rep["layers"] if r["pruned"]) for rep in (plain, comp)]
    assert first[0]["kept_heads"] == first[1]["kept_heads"] and len(first[0]["kept_heads"]) < 6
    assert first[0]["kept_channels"] == first[1]["kept_channels"]
    o = [m.model.layers[1].self_attn.o_proj.weight for m in (m0, m1)]
    assert o[0].shape == o[1].shape and not torch.equal(o[0], o[1])
    assert first[1]["error_heldout"] < first[0]["error_heldout"]
    assert comp["settings"]["compensate_heads"] is True


def test_compensated_attention_error_is_the_least_squares_residual():
    """Under --compensate-heads the split weighs the attention error left after compensation: the residual energy
    of the best least-squares fit of O z by the kept columns, computed here with lstsq."""
    from daprune.pipeline import BlockPruner

    g = torch.Generator().manual_seed(7)
    z = torch.randn(600, 12, generator=g, dtype=torch.float64) @ torch.randn(12, 12, generator=g, dtype=torch.float64)
    o = torch.randn(5, 12, generator=g, dtype=torch.float64)
    gone = torch.tensor([1, 4, 5, 9])
    keep = [c for c in range(12) if c not in gone.tolist()]
    fit = torch.linalg.lstsq(z[:, keep], z @ o.T).solution
    want = float((z @ o.T - z[:, keep] @ fit).pow(2).sum(1).mean())
    plain = float((z[:, gone] @ o[:, gone].T).pow(2).sum(1).mean())
    pruner = BlockPruner.__new__(BlockPruner)
    second = (z.T @ z / 600).float()
    for on, expected in ((True, want), (False, plain)):
        pruner.cfg = PruneConfig(compensate_heads=on, obs_damp=1e-9)
        assert pruner.attn_error(o.float(), second, gone) == pytest.approx(expected, rel=1e-3)
    assert want < 0.9 * plain
    from daprune.block_ops import compensate

    pruner.cfg = PruneConfig(compensate_heads=True, obs_damp=0.5)  # damped: the residual of compensate()'s weight
    w = compensate(o.float(), second, keep, 0.5).double()
    damped = float((z @ o.T - z @ w.T).pow(2).sum(1).mean())
    assert pruner.attn_error(o.float(), second, gone) == pytest.approx(damped, rel=1e-3)
    assert want < damped < plain


@pytest.mark.parametrize("kw, match", [
    (dict(head_criterion="none"), "removes no heads"),
    (dict(recovery="post"), "replacing --compensate-heads"),
    (dict(recovery="both"), "replacing --compensate-heads"),
])
def test_compensate_heads_that_would_be_ignored_is_refused(kw, match):
    with pytest.raises(ConfigError, match=match):
        PruneConfig(compensate_heads=True, **kw).validate()
    PruneConfig(compensate_heads=True, recovery="post", recovery_prior="original").validate()
    PruneConfig(compensate_heads=True, recovery="heldout", heldout_nsamples=4).validate()


@pytest.mark.parametrize("damp", [1e-2, 1.0, 100.0])
def test_compensation_is_what_damped_obs_ends_with(damp):
    """compensate() on the channels OBS kept gives OBS's own compensated weight at any damping: both minimise
    the damped-Hessian objective, i.e. a ridge toward the original columns (a strong damping leaves them alone)."""
    from daprune.block_ops import compensate
    from daprune.selection import obs_order

    g = torch.Generator().manual_seed(5)
    h = torch.randn(300, 16, generator=g, dtype=torch.float64) @ torch.randn(16, 16, generator=g, dtype=torch.float64)
    d = torch.randn(6, 16, generator=g, dtype=torch.float64)
    second = (h.T @ h / 300).float()
    order, w_obs = obs_order(d.float(), second, 5, damp)
    keep = [c for c in range(16) if c not in order]
    w = compensate(d.float(), second, keep, damp)
    torch.testing.assert_close(w, w_obs, rtol=2e-3, atol=2e-4)
    if damp == 100.0:
        assert (w[:, keep] - d[:, keep].float()).abs().max() < 0.05 * d.abs().max()
