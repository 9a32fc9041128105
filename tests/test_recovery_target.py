"""``--recovery-target block``: down_proj re-fitted to the dense *block* output on the pruned stream.

The expected fit is computed here independently: torch hooks on the pruned block give its down_proj input H and
everything else the block adds up (its output minus down_proj's output), and numpy's least squares solves
H W^T = yd - that rest.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import CharTokenizer, tiny_model
from test_families import tiny as tiny_llama_like

from daprune.api import prune
from daprune.block_ops import copy_block
from daprune.config import PruneConfig
from daprune.criteria.base import get_criterion
from daprune.errors import ConfigError
from daprune.fit_checks import check_criteria_fit
from daprune.models.adapter import get_adapter
from daprune.pipeline import BlockPruner
from daprune.recovery import block_target_step
from daprune.stores import ResidentStore

N, SEQ = 24, 16


@torch.no_grad()
def _prune_block(target: str, family: str = "llama", recovery: str = "post", n_fit: int = N, gains=None,
                 whole: bool = False):
    model = tiny_model() if family == "llama" else tiny_llama_like(family)
    adapter = get_adapter(model)
    block = adapter.block(2)
    if gains is not None:
        block.layer.post_feedforward_layernorm.weight.copy_(gains)
    dense = copy_block(block)
    g = torch.Generator().manual_seed(0)
    xd = torch.randn(N, SEQ, model.config.hidden_size, generator=g)
    xp = xd + 0.5 * torch.randn(xd.shape, generator=g)  # the pruned stream has drifted from the dense one
    ctx = ResidentStore(adapter).layer_inputs(SEQ)[1]
    yd = dense.forward(xd, ctx)
    cfg = PruneConfig(recovery=recovery, recovery_target=target, recovery_prior="original", recovery_damp=1e-9,
                      channel_multiple=1, head_split="paper", batch_size=8)
    params = sum(p.numel() for p in block.layer.parameters())
    pruner = BlockPruner(cfg, get_criterion("second-moment"), get_criterion("second-moment"), 0.3 * params)
    pruner.n_score = pruner.n_fit = n_fit
    pruner.ntokens = N * SEQ
    rec = pruner.prune(block, dense, xp, xd, yd, ctx, whole=whole)
    return block, rec, xp, yd, ctx


@torch.no_grad()
def _parts(block, x, ctx):
    """The pruned block's down_proj input and everything else it adds up to its output, from torch hooks."""
    got = {}
    down = block.ffn_out()
    handle = down.register_forward_hook(lambda _m, args, out: got.update(h=args[0], o=out))
    try:
        y = block.forward(x, ctx)
    finally:
        handle.remove()
    return got["h"].reshape(-1, got["h"].shape[-1]).double(), (y - got["o"]).reshape(-1, y.shape[-1]).double()


def test_block_target_is_the_least_squares_fit_to_the_dense_block_output(one_thread):
    blocks = {t: _prune_block(t) for t in ("linear", "block")}
    (lin_block, lin_rec, xp, yd, ctx), (blk_block, blk_rec, *_) = blocks["linear"], blocks["block"]
    # the target changes the re-fit only, not what is removed
    assert lin_rec.kept_heads == blk_rec.kept_heads and lin_rec.kept_channel_idx == blk_rec.kept_channel_idx
    assert len(blk_rec.kept_heads) < 6 and blk_rec.kept_channels < 96
    h, rest = _parts(blk_block, xp, ctx)
    target = yd.reshape(-1, yd.shape[-1]).double() - rest
    w, *_ = np.linalg.lstsq(h.numpy(), target.numpy(), rcond=None)
    best = float(((h.numpy() @ w - target.numpy()) ** 2).sum())

    def error(block) -> float:
        with torch.no_grad():
            return float((block.forward(xp, ctx).double() - yd.double()).pow(2).sum())

    assert error(blk_block) == pytest.approx(best, rel=1e-3)
    assert error(lin_block) > 1.05 * best  # the linear target ignores the drift of the residual stream


def test_block_target_needs_a_refit():
    with pytest.raises(ConfigError, match="re-fits nothing"):
        PruneConfig(recovery_target="block").validate()
    PruneConfig(recovery="post", recovery_target="block").validate()


def test_block_target_refused_where_the_family_does_not_say():
    """Post-LN OPT normalises the residual sum itself: refused before any work."""
    from test_families_extra import tiny as tiny_other

    cfg = PruneConfig(recovery="post", recovery_target="block", layers="1:-1")
    model = tiny_other("opt")
    for layer in model.model.decoder.layers:
        layer.do_layer_norm_before = False
    with pytest.raises(ConfigError, match="recovery-target linear"):
        check_criteria_fit(get_adapter(model), cfg)
    check_criteria_fit(get_adapter(tiny_model()), cfg)
    check_criteria_fit(get_adapter(tiny_llama_like("gemma3_text")), cfg)
    with torch.device("meta"):  # a streamed model (GGUF, --streaming) has no weights yet when this is asked
        streamed = tiny_llama_like("gemma3_text")
    check_criteria_fit(get_adapter(streamed), cfg)


@torch.no_grad()
def test_gemma_gain_is_the_post_norm_jacobian_across_its_input():
    """Through Gemma-3's post-FFN norm a move of the FFN output orthogonal to it moves the block output by the
    gain times that move; checked against autograd's Jacobian-vector product of the model's own norm."""
    block = get_adapter(tiny_llama_like("gemma3_text")).block(1)
    norm = block.layer.post_feedforward_layernorm
    norm.weight.uniform_(-0.5, 0.5)
    g = torch.Generator().manual_seed(0)
    o = torch.randn(5, norm.weight.shape[0], generator=g, dtype=torch.float64) * 3
    d = torch.randn(o.shape, generator=g, dtype=torch.float64)
    d -= (d * o).sum(-1, keepdim=True) / o.pow(2).sum(-1, keepdim=True) * o  # across o, row by row
    norm64 = copy.deepcopy(norm).double()
    with torch.enable_grad():
        _, jvp = torch.func.jvp(norm64, (o,), (d,))
    torch.testing.assert_close(block.ffn_output_gain(o).double() * d, jvp, rtol=1e-5, atol=1e-6)


def test_block_target_lowers_the_block_error_through_gemmas_post_norm(one_thread):
    lin = _prune_block("linear", "gemma3_text")
    blk = _prune_block("block", "gemma3_text")
    (lin_block, _, xp, yd, ctx), (blk_block, *_) = lin, blk
    with torch.no_grad():
        errors = [float((b.forward(xp, ctx) - yd).pow(2).sum()) for b in (lin_block, blk_block)]
    assert errors[1] < 0.9 * errors[0], errors


def test_block_target_end_to_end_changes_the_model(one_thread):
    kw = dict(tokenizer=CharTokenizer(), calibration="random", nsamples=16, seqlen=32, layers="1:-1", batch_size=4,
              progress=False, sparsity=0.3, recovery="post", recovery_prior="original")
    lin = prune(model=tiny_model(), **kw)
    blk = prune(model=tiny_model(), recovery_target="block", **kw)
    assert blk.report["settings"]["recovery_target"] == "block"
    assert blk.report["kept_channels"] == lin.report["kept_channels"]
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    assert not torch.allclose(blk.model(ids).logits, lin.model(ids).logits)


@torch.no_grad()
def test_block_step_through_a_norm_with_a_dead_channel_moves_the_output_toward_the_target():
    """Gemma-3-270M's post-FFN norms have channels with gains under 1% of the median. Dividing the shortfall by
    such a gain asks for an output the norm answers by shrinking every other channel; the damped step does not.
    Judged through the model's own norm: how far norm(o + step) is from norm(o) + shortfall."""
    block = get_adapter(tiny_llama_like("gemma3_text")).block(1)
    norm = block.layer.post_feedforward_layernorm
    g = torch.Generator().manual_seed(1)
    width = norm.weight.shape[0]
    norm.weight.copy_(torch.rand(width, generator=g) + 0.5)
    norm.weight[3] = -1.0 + 1e-4  # Gemma's gain is 1 + weight: this channel's is 1e-4
    o = torch.randn(64, width, generator=g) * 2
    shortfall = 0.05 * torch.randn(o.shape, generator=g) * norm(o).abs().mean()
    gain = block.ffn_output_gain(o)
    want = norm(o) + shortfall

    def miss(step):
        return float((norm(o + step) - want).pow(2).sum())

    damped, quotient = block_target_step(o, shortfall, gain), shortfall / gain
    assert float(damped[:, 3].abs().max()) < 1e-2 * float(quotient[:, 3].abs().max())  # the dead channel stays put
    assert float(damped[:, 3].abs().max()) <= float(o.abs().max())
    torch.testing.assert_close((damped * o).sum(-1), torch.zeros(64), atol=1e-3, rtol=0)  # nothing along o
    assert miss(damped) < 0.2 * miss(torch.zeros_like(o))  # most of the shortfall is made up
    assert miss(quotient) > miss(torch.zeros_like(o))  # the plain quotient overshoots: worse than no move
    torch.testing.assert_close(block_target_step(o, shortfall, 2.0), shortfall / 2.0)  # a plain add: exact


def test_heldout_choice_through_gemmas_norm_is_judged_on_the_real_block_output(one_thread):
    """--recovery heldout with the block target on Gemma-3: the reported held-out error of the chosen re-fit is
    the block's real output error on the held-out rows, from a forward pass of the pruned block."""
    gains = torch.rand(48, generator=torch.Generator().manual_seed(2)) * 2 - 0.5
    gains[5] = -1.0  # a dead channel (gain 1 + weight = 0)
    n_fit = N - 8
    block, rec, xp, yd, ctx = _prune_block("block", "gemma3_text", recovery="heldout", n_fit=n_fit, gains=gains)
    info = rec.damping["down_post"]
    errors = info["heldout_errors"]
    chosen = "none" if info["damp"] is None else f"{info['damp']:g}"
    assert errors[chosen] == min(errors.values())
    with torch.no_grad():
        real = (block.forward(xp[n_fit:], ctx) - yd[n_fit:]).double().pow(2).sum(-1).mean()
    assert errors[chosen] == pytest.approx(float(real), rel=1e-4)
