"""``--compensate-mean``: removed channels and heads leave their mean contribution behind as a bias, and the choice
and compensation read the centred covariance. Each claim checked against a computation made here."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CharTokenizer, tiny_model

from daprune.config import PruneConfig
from daprune.errors import ConfigError


def _down_data(rows: int, channels: int, constant: list[int], seed: int) -> torch.Tensor:
    """down_proj inputs: the ``constant`` channels sit near 4 (std 0.05), the rest are N(0, 1)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, channels, generator=g)
    x[:, constant] = 4 + 0.05 * x[:, constant]
    return x


@pytest.mark.parametrize("selection", ["greedy", "obs"])
def test_near_constant_channels_go_and_their_mean_comes_back(selection, one_thread):
    """With --compensate-mean the channels that barely move are the cheap ones (their mean returns as a bias), so
    they are the ones removed; the down_proj output keeps its mean on the fit rows and, on rows drawn afresh, the
    error is a small fraction of what removal by second moment (no bias) leaves. (OBS on the second moment removes
    most of them too, compensating through the one it keeps: that carries the mean less well.)"""
    from daprune.criteria.base import get_criterion
    from daprune.models.adapter import get_adapter
    from daprune.pipeline import BlockPruner
    from daprune.selection import obs_ranking
    from daprune.stats import Moments

    dense = get_adapter(tiny_model()).block(1)
    n = dense.n_channels
    constant = list(range(0, n, 4))  # a quarter of the channels
    fit, fresh = _down_data(4000, n, constant, 1), _down_data(4000, n, constant, 2)
    w0 = dense.ffn_out().weight.detach().double().clone()
    errors, removed_sets = {}, {}
    for on in (False, True):
        block = copy.deepcopy(dense)
        pruner = BlockPruner(PruneConfig(selection=selection, compensate_mean=on), get_criterion("second-moment"),
                             None, 0.0)
        mom = Moments("down_in", full_cov=True)
        mom.update(fit)
        before = block.ffn_out().weight.data.float().clone()
        if selection == "obs":
            order, w = obs_ranking(before, pruner.energy(mom), len(constant), 1e-6)
            block.ffn_out().weight.data.copy_(w)
        else:
            order = torch.tensor(pruner.greedy(block, mom, len(constant)))
        removed = sorted(order[: len(constant)].tolist())
        keep = [c for c in range(n) if c not in removed]
        pruner.compensate_mean(block, "mlp", before, keep, mom)
        block.slice_ffn(keep)
        down = block.ffn_out()
        assert (down.bias is not None) == on
        with torch.no_grad():
            out_fit, out_fresh = down(fit[:, keep]).double(), down(fresh[:, keep]).double()
        if on:  # the mean output on the fit rows is the dense one (float64 here)
            torch.testing.assert_close(out_fit.mean(0), (fit.double() @ w0.T).mean(0), rtol=0, atol=1e-4)
        errors[on] = float((out_fresh - fresh.double() @ w0.T).pow(2).sum(1).mean())
        removed_sets[on] = removed
    assert removed_sets[True] == constant
    if selection == "greedy":
        assert not set(removed_sets[False]) & set(constant)  # by second moment they are the costliest
        assert errors[True] < 0.05 * errors[False], errors
    else:  # OBS on the second moment can carry the mean through one kept near-constant channel, but not as well
        assert errors[True] < 0.25 * errors[False], errors


def _prune(model, **kw):
    from daprune.api import prune

    settings = dict(calibration="random", nsamples=8, seqlen=24, layers="0:", head_split="paper", batch_size=4,
                    progress=False)
    settings.update(kw)
    return prune(model=model, tokenizer=CharTokenizer(), **settings)


def test_mean_compensated_model_reloads_and_counts_its_biases(tmp_path, one_thread):
    """The biases go model-wide (config flags), the saved folder reloads in vanilla transformers to the same
    logits, and report params.after is the parameter count of what was written."""
    from transformers import AutoModelForCausalLM

    model = tiny_model(layers=3)
    res = _prune(model, sparsity=0.3, compensate_mean=True, out=str(tmp_path / "out"))
    pruned = res.model
    assert pruned.config.mlp_bias and pruned.config.attention_bias
    assert all(float(layer.mlp.down_proj.bias.detach().abs().sum()) > 0 for layer in pruned.model.layers)
    assert res.report["settings"]["compensate_mean"] is True
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, pruned(ids).logits, rtol=0, atol=1e-5)
    assert res.report["params"]["after"] == sum(p.numel() for p in loaded.parameters())


def test_mean_compensation_at_zero_sparsity_changes_nothing(one_thread):
    model = tiny_model(layers=3)
    ref = copy.deepcopy(model)
    _prune(model, sparsity=0.0, compensate_mean=True)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits, rtol=0, atol=0)
    assert all(layer.mlp.down_proj.bias is None for layer in model.model.layers)


@pytest.mark.parametrize("kw", [dict(ffn_criterion="flap"), dict(head_criterion="flap")])
def test_mean_compensation_with_flap_is_refused(kw):
    with pytest.raises(ConfigError, match="drop --compensate-mean"):
        PruneConfig(compensate_mean=True, **kw).validate()
