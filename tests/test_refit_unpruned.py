"""``--refit-unpruned``: blocks left whole downstream of pruned ones get the re-fits of a pruned block.

Expected values are computed here independently: torch hooks on the block give down_proj's input H and the rest of
the block output, and numpy's least squares solves H W^T = dense block output - rest (the block target), as
tests/test_recovery_target.py does for a pruned block.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CharTokenizer, tiny_model
from test_moe import tiny as tiny_moe
from test_recovery_target import _parts, _prune_block

from daprune.api import prune
from daprune.config import PruneConfig
from daprune.errors import ConfigError
from daprune.fit_checks import check_criteria_fit
from daprune.models.adapter import get_adapter


@torch.no_grad()
def test_a_whole_block_keeps_its_shape_and_fits_the_dense_stream(one_thread):
    block, rec, xp, yd, ctx = _prune_block("block", whole=True)
    untouched = get_adapter(tiny_model()).block(2)  # the same seeded weights, never re-fitted

    assert rec.refit and not rec.pruned and rec.plan["channels"] == 0 and rec.plan["selection"] == "none"
    assert rec.kept_heads == list(range(6)) and rec.kept_channels == 96
    before = dict(untouched.layer.named_parameters())
    assert {n: p.shape for n, p in block.layer.named_parameters()} == {n: p.shape for n, p in before.items()}
    changed = {n for n, p in block.layer.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {"self_attn.o_proj.weight", "mlp.down_proj.weight"}  # no --recovery-inputs: q/k/v, gate/up stay

    h, rest = _parts(block, xp, ctx)
    target = yd.reshape(-1, yd.shape[-1]).double() - rest
    w, *_ = np.linalg.lstsq(h.numpy(), target.numpy(), rcond=None)
    best = float(((h.numpy() @ w - target.numpy()) ** 2).sum())
    error = float((block.forward(xp, ctx).double() - yd.double()).pow(2).sum())
    plain = float((untouched.forward(xp, ctx).double() - yd.double()).pow(2).sum())
    assert error == pytest.approx(best, rel=1e-3)
    assert error < 0.9 * plain


def _final_hidden(model, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids, output_hidden_states=True).hidden_states[-1]


def test_end_to_end_only_blocks_after_the_first_pruned_one_change_and_unseen_rows_get_closer(one_thread):
    kw = dict(tokenizer=CharTokenizer(), calibration="random", nsamples=96, seqlen=32, layers="1:3", batch_size=16,
              progress=False, sparsity=0.2, recovery="heldout", heldout_nsamples=32, recovery_target="block")
    dense = tiny_model()
    plain = prune(model=tiny_model(), **kw)
    refit = prune(model=tiny_model(), refit_unpruned=True, **kw)
    assert refit.report["settings"]["refit_unpruned"] is True
    assert refit.report["kept_channels"] == plain.report["kept_channels"]
    assert refit.report["params"]["after"] == plain.report["params"]["after"]
    layers = {row["index"]: row for row in refit.report["layers"]}
    assert [i for i, row in layers.items() if row["refit"]] == [3, 4, 5]
    assert [i for i, row in layers.items() if row["pruned"]] == [1, 2]
    assert layers[4]["error_heldout"] <= layers[4]["error_no_recovery_heldout"]

    def same(a, b, i: int) -> bool:
        pairs = zip(a.model.layers[i].parameters(), b.model.layers[i].parameters(), strict=True)
        return all(torch.equal(p, q) for p, q in pairs)

    assert same(refit.model, dense, 0) and same(plain.model, dense, 0)  # before the first pruned block
    assert all(same(plain.model, dense, i) for i in (3, 4, 5))  # left whole without the setting
    assert not any(same(refit.model, dense, i) for i in (3, 4, 5))

    ids = torch.randint(0, 128, (32, 32), generator=torch.Generator().manual_seed(11))  # rows no fit has seen
    target = _final_hidden(dense, ids)
    errors = [float((_final_hidden(m.model, ids) - target).pow(2).sum()) for m in (plain, refit)]
    assert errors[1] < 0.95 * errors[0], errors


def test_refused_without_a_recovery_at_zero_sparsity_and_on_experts():
    with pytest.raises(ConfigError, match="--recovery other than none"):
        PruneConfig(refit_unpruned=True).validate()
    with pytest.raises(ConfigError, match="sparsity 0"):
        PruneConfig(refit_unpruned=True, recovery="post", sparsity=0.0).validate()
    cfg = PruneConfig(refit_unpruned=True, recovery="post", layers="0:1")
    cfg.validate()
    check_criteria_fit(get_adapter(tiny_model()), cfg)
    with pytest.raises(ConfigError, match="experts"):
        check_criteria_fit(get_adapter(tiny_moe("mixtral")), cfg)
