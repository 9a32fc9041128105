"""capture(stop=True): a statistics pass that needs only some linears' inputs ends the forward after them.

The expected values are those of the same pass run to the end (early stopping switched off), so the test checks
that stopping changes nothing but the work done, and that the work really is skipped.
"""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

import daprune.pipeline as pipeline
from daprune.block_ops import copy_block
from daprune.config import PruneConfig
from daprune.criteria.base import get_criterion
from daprune.hooks import capture
from daprune.models.adapter import get_adapter
from daprune.pipeline import BlockPruner
from daprune.stores import ResidentStore


def _block():
    model = tiny_model()
    adapter = get_adapter(model)
    ctx = ResidentStore(adapter).layer_inputs(16)[1]
    return adapter.block(1), ctx


def _calls(module: torch.nn.Module) -> list[int]:
    count = [0]
    module.register_forward_hook(lambda *_: count.__setitem__(0, count[0] + 1))
    return count


def test_capture_stops_after_the_last_recorded_module_with_the_same_records(one_thread):
    block, ctx = _block()
    x = torch.randn(2, 16, block.layer.self_attn.q_proj.in_features, generator=torch.Generator().manual_seed(1))
    mods = {"q": block.layer.self_attn.q_proj, "v": block.layer.self_attn.v_proj}
    with capture(mods) as full:
        y = block.forward(x, ctx)
    assert y is not None
    down = _calls(block.layer.mlp.down_proj)
    o = _calls(block.layer.self_attn.o_proj)
    with capture(mods, stop=True) as early:
        block.forward(x, ctx)
    assert down[0] == 0 and o[0] == 0  # nothing after v_proj ran
    for name in mods:
        assert torch.equal(early[name][0], full[name][0]) and torch.equal(early[name][1], full[name][1])
    block.forward(x, ctx)  # the hooks are gone: a later forward runs to the end
    assert down[0] == 1


@pytest.mark.parametrize("roles", [{"attn_in": True}, {"ffn_in": True}, {"o_in": True, "down_in": False}])
def test_a_stopped_statistics_pass_equals_the_full_pass(one_thread, monkeypatch, roles):
    """Every moment (fit rows, held-out rows, cross terms with the dense linears) is bitwise the full pass's."""
    block, ctx = _block()
    dense = copy_block(block)
    with torch.no_grad():  # a pruned stream that differs from the dense one
        for p in block.layer.parameters():
            p.mul_(1 + 0.05 * torch.randn(p.shape, generator=torch.Generator().manual_seed(2)))
    g = torch.Generator().manual_seed(3)
    xd = torch.randn(6, 16, block.layer.self_attn.q_proj.in_features, generator=g)
    xp = xd + 0.1 * torch.randn(xd.shape, generator=g)
    cfg = PruneConfig(recovery="heldout", nsamples=4, heldout_nsamples=2, batch_size=2)
    pruner = BlockPruner(cfg, get_criterion("second-moment"), None, 0.0)
    pruner.n_fit = pruner.n_score = 4

    down_p, down_d = _calls(block.layer.mlp.down_proj), _calls(dense.layer.mlp.down_proj)
    early = pruner.collect(block, dense, xp, xd, ctx, roles)
    skipped = down_p[0] == 0 and down_d[0] == 0
    monkeypatch.setattr(pipeline, "is_moe", lambda _b: True)  # switches early stopping off, nothing else here
    full = pruner.collect(block, dense, xp, xd, ctx, roles)

    assert skipped == ("down_in" not in roles)  # the passes that need no FFN output never run down_proj
    assert set(early) == set(full) and any(k.endswith(":heldout") for k in full)
    for key, m in full.items():
        e = early[key]
        assert e.n == m.n
        for attr in ("sum", "gram", "cross", "ysum"):
            a, b = getattr(e, attr, None), getattr(m, attr, None)
            assert (a is None) == (b is None), (key, attr)
            if b is not None:
                assert torch.equal(a, b), (key, attr)
