"""``--recovery-inputs``: q/k/v and gate/up re-fitted to their dense outputs on the pruned stream.

The expected weights are computed here independently: torch hooks give each linear's input on the pruned stream
(the block's own norms) and the dense linear's output on the dense stream, and numpy's least squares solves
X W^T = Y; the held-out check measures each linear's error on rows no statistic saw, from the same hooks.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CharTokenizer, tiny_model
from test_moe import tiny as tiny_moe

from daprune.api import prune
from daprune.block_ops import copy_block
from daprune.config import PruneConfig
from daprune.criteria.base import get_criterion
from daprune.errors import ConfigError
from daprune.fit_checks import check_criteria_fit
from daprune.models.adapter import get_adapter
from daprune.pipeline import BlockPruner
from daprune.stores import ResidentStore

N, SEQ, HELD = 24, 16, 8


@torch.no_grad()
def _prune_block(recovery: str, inputs: bool, n_fit: int = N, mix: float = 0.0):
    model = tiny_model()
    adapter = get_adapter(model)
    block = adapter.block(2)
    dense = copy_block(block)
    g = torch.Generator().manual_seed(0)
    xd = torch.randn(N, SEQ, model.config.hidden_size, generator=g)
    xp = xd + 0.5 * torch.randn(xd.shape, generator=g)  # the pruned stream has drifted from the dense one
    if mix:  # a drift mostly a linear map of the dense stream, which a re-fit can undo on rows it never saw
        h = xd.shape[-1]
        xp = xd @ (torch.eye(h) + mix * torch.randn(h, h, generator=g) / h**0.5) + 0.05 * (xp - xd)
    ctx = ResidentStore(adapter).layer_inputs(SEQ)[1]
    yd = dense.forward(xd, ctx)
    extra = {} if recovery == "heldout" else {"recovery_damp": 1e-9}
    cfg = PruneConfig(recovery=recovery, recovery_inputs=inputs, recovery_prior="original", channel_multiple=1,
                      head_split="paper", batch_size=8, heldout_nsamples=N - n_fit, **extra)
    params = sum(p.numel() for p in block.layer.parameters())
    pruner = BlockPruner(cfg, get_criterion("second-moment"), get_criterion("second-moment"), 0.3 * params)
    pruner.n_score = pruner.n_fit = n_fit
    pruner.ntokens = n_fit * SEQ
    rec = pruner.prune(block, dense, xp, xd, yd, ctx)
    return block, dense, rec, xp, xd, ctx


@torch.no_grad()
def _io(block, linear, x, ctx):
    """``linear``'s input and output when ``block`` runs on ``x``, as [tokens, features] float64."""
    got = {}
    handle = linear.register_forward_hook(lambda _m, args, out: got.update(x=args[0], y=out))
    try:
        block.forward(x, ctx)
    finally:
        handle.remove()
    return (got["x"].reshape(-1, got["x"].shape[-1]).double(), got["y"].reshape(-1, got["y"].shape[-1]).double())


def _kept_rows(rec, name: str, n_rows: int, head_dim: int, q_per_kv: int) -> list[int]:
    """The rows of the dense q/k/v (or gate/up) linear that survive in the pruned block."""
    if name in ("gate_proj", "up_proj"):
        return rec.kept_channel_idx
    heads = rec.kept_heads if name == "q_proj" else sorted({h // q_per_kv for h in rec.kept_heads})
    return [h * head_dim + d for h in heads for d in range(head_dim)]


def test_input_linears_are_the_least_squares_fit_to_their_dense_outputs(one_thread):
    block, dense, rec, xp, xd, ctx = _prune_block("post", True)
    cfg = dense.layer.self_attn.config
    head_dim, q_per_kv = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
    assert 0 < len(rec.kept_heads) < cfg.num_attention_heads and 0 < rec.kept_channels < cfg.intermediate_size
    assert {"qkv", "gate_up"} <= set(rec.damping)
    for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
        for name in names:
            pruned = getattr(getattr(block.layer, part), name)
            x, _ = _io(block, pruned, xp, ctx)  # the input the re-fit saw: the pruned block's own norm, final heads
            _, y = _io(dense, getattr(getattr(dense.layer, part), name), xd, ctx)
            rows = _kept_rows(rec, name, y.shape[1], head_dim, q_per_kv)
            w, *_ = np.linalg.lstsq(x.numpy(), y[:, rows].numpy(), rcond=None)
            np.testing.assert_allclose(pruned.weight.detach().double().numpy(), w.T, rtol=2e-3, atol=2e-4, err_msg=name)


def test_without_the_setting_the_input_linears_keep_their_dense_weights(one_thread):
    block, dense, rec, *_ = _prune_block("post", False)
    assert "qkv" not in rec.damping and "gate_up" not in rec.damping
    rows = rec.kept_channel_idx
    torch.testing.assert_close(block.layer.mlp.up_proj.weight, dense.layer.mlp.up_proj.weight[rows])


def test_heldout_refit_lowers_each_input_linears_error_on_unseen_rows(one_thread):
    """Under ``--recovery heldout`` a strength is kept only where the held-out rows prefer it: measured here on those
    rows from hooks, each re-fitted linear's error is below the dense weights' on the same pruned-stream input."""
    n_fit = N - HELD
    block, dense, rec, xp, xd, ctx = _prune_block("heldout", True, n_fit, mix=0.5)
    cfg = dense.layer.self_attn.config
    lowered = 0
    for part, names in (("self_attn", ("q_proj", "k_proj", "v_proj")), ("mlp", ("gate_proj", "up_proj"))):
        for name in names:
            pruned = getattr(getattr(block.layer, part), name)
            orig = getattr(getattr(dense.layer, part), name)
            x, _ = _io(block, pruned, xp[n_fit:], ctx)
            _, y = _io(dense, orig, xd[n_fit:], ctx)
            rows = _kept_rows(rec, name, y.shape[1], cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads)
            w_now, w_dense = pruned.weight.detach().double(), orig.weight.detach().double()[rows]
            err_now = float((x @ w_now.T - y[:, rows]).pow(2).sum())
            err_dense = float((x @ w_dense.T - y[:, rows]).pow(2).sum())
            assert err_now <= err_dense * (1 + 1e-6), name
            lowered += err_now < 0.99 * err_dense
    assert lowered >= 2  # the drift is partly undone, not just left alone
    assert rec.damping["qkv"]["heldout_errors"] and rec.damping["gate_up"]["heldout_errors"]


@pytest.mark.parametrize("recovery", ["none", "paper", "both"])
def test_refused_where_it_would_mean_nothing_new(recovery):
    with pytest.raises(ConfigError, match="--recovery-inputs"):
        PruneConfig(recovery=recovery, recovery_inputs=True).validate()
    PruneConfig(recovery="post", recovery_inputs=True).validate()
    PruneConfig(recovery="heldout", recovery_inputs=True, heldout_nsamples=4).validate()


def test_refused_for_experts():
    """Experts take no re-fit at all (daprune.experts), so the setting never reaches a half-done expert block."""
    cfg = PruneConfig(recovery="post", recovery_inputs=True, layers="1:3")
    with pytest.raises(ConfigError, match="mixture-of-experts"):
        check_criteria_fit(get_adapter(tiny_moe("mixtral")), cfg)
    check_criteria_fit(get_adapter(tiny_model()), cfg)


def test_end_to_end_the_setting_changes_the_model_and_is_reported(one_thread):
    kw = dict(tokenizer=CharTokenizer(), calibration="random", nsamples=16, seqlen=32, layers="1:-1", batch_size=4,
              progress=False, sparsity=0.3, recovery="heldout", heldout_nsamples=4)
    plain = prune(model=tiny_model(), **kw)
    refit = prune(model=tiny_model(), recovery_inputs=True, **kw)
    assert refit.report["settings"]["recovery_inputs"] is True
    assert plain.report["settings"]["recovery_inputs"] is False
    a, b = plain.model.model.layers[2].self_attn.q_proj.weight, refit.model.model.layers[2].self_attn.q_proj.weight
    assert a.shape == b.shape and not torch.equal(a, b)
