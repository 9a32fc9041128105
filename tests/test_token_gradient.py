"""``--token-weight gradient``: each calibration token's output error weighted by ||g_t||^2, g_t the dense model's
next-token-loss gradient at the block's attention / FFN output.

The weights are checked against an independent autograd computation (a zero added to each output linear's output);
the statistics against numpy's weighted sums, attention rows by the attention output's gradients and FFN rows by the
FFN output's; weights of one everywhere give exactly the unweighted prune, the real ones another.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import CharTokenizer, output_linear_gradients, tiny_model

from daprune.api import prune
from daprune.fisher import token_gradients
from daprune.models.adapter import get_adapter
from daprune.stores import ResidentStore

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, adapter, ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """sum over hidden dimensions of (dL/dy_t)^2 per token, L the summed next-token NLL, by differentiating a zero
    added to each output linear's output."""
    out: dict[int, dict[str, torch.Tensor]] = {}
    for (i, role), g in output_linear_gradients(model, adapter, ids).items():
        out.setdefault(i, {})[role] = g.double().pow(2).sum(-1).reshape(ids.shape)
    return out


def test_token_gradients_equal_an_independent_computation_whole_or_streamed():
    model = tiny_model(layers=3)
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (5, 20), generator=torch.Generator().manual_seed(1))
    want = _reference(model, adapter, ids)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    whole = token_gradients(adapter, ids, batch_size=2, progress=False, model=model)  # uneven batches: 2 + 2 + 1
    streamed = token_gradients(adapter, ids, batch_size=2, progress=False, store=ResidentStore(adapter))
    for got in (whole, streamed):
        assert sorted(got) == [0, 1, 2]
        for i in got:
            for role in ("o", "down"):
                torch.testing.assert_close(got[i][role].double(), want[i][role], rtol=1e-4, atol=1e-9)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    w = want[1]["down"]
    assert float(w[:, -1].abs().max()) == 0.0  # the last position predicts nothing inside the window
    assert float(w[:, :-1].max() / w[:, :-1].min()) > 3  # not uniform: the setting can change something


def test_statistics_weight_attention_and_ffn_rows_by_their_own_gradients():
    """Gram and cross term of o_proj's input equal numpy's sums weighted by the attention output's token gradients,
    down_proj's by the FFN output's, each scaled to mean 1 over the rows the statistics see (not the held-out one)."""
    from daprune.block_ops import copy_block
    from daprune.config import PruneConfig
    from daprune.criteria.base import get_criterion
    from daprune.hooks import capture
    from daprune.pipeline import BlockPruner

    gen = torch.Generator().manual_seed(4)
    x = torch.randn(5, 12, 48, generator=gen)
    adapter = get_adapter(tiny_model())
    ctx = ResidentStore(adapter).layer_inputs(x.shape[1])[1]
    block = adapter.block(1)
    grads = {"o": torch.rand(5, 12, generator=gen) ** 3, "down": torch.rand(5, 12, generator=gen) ** 3}
    grads["o"][4] = 100.0  # the held-out row: a weight this large would show in the mean if it were counted
    cfg = PruneConfig(token_weight="gradient", nsamples=4, batch_size=3)
    pruner = BlockPruner(cfg, get_criterion("second-moment"), None, 0.0, token_grads={1: grads})
    pruner.n_fit = 4
    m = pruner.collect(block, copy_block(block), x, x, ctx, {"o_in": True, "down_in": False})
    with torch.no_grad(), capture({"o": block.attn_out(), "d": block.ffn_out()}) as got:
        block.forward(x[:4], ctx)
    o_in, o_out, d_in = (got[k][i].double().numpy().reshape(-1, got[k][i].shape[-1])
                         for k, i in (("o", 0), ("o", 1), ("d", 0)))
    wo = grads["o"][:4].double().numpy().reshape(-1)
    wd = grads["down"][:4].double().numpy().reshape(-1)
    wo, wd = wo / wo.mean(), wd / wd.mean()
    np.testing.assert_allclose(m["o_in"].gram.double().numpy(), (o_in * wo[:, None]).T @ o_in, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(m["o_in"].cross.double().numpy(), (o_in * wo[:, None]).T @ o_out, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(m["down_in"].gram.double().numpy(), (d_in * wd[:, None]).T @ d_in, rtol=2e-4,
                               atol=1e-5)
    swapped = (d_in * wo[:, None]).T @ d_in
    assert not np.allclose(m["down_in"].gram.double().numpy(), swapped, rtol=1e-2)


def _prune(**kw):
    return prune(model=tiny_model(), tokenizer=CharTokenizer(), calibration="random", nsamples=8, seqlen=32,
                 layers="1:-1", batch_size=4, progress=False, sparsity=0.3, **kw)


def test_unit_weights_are_the_unweighted_prune_and_real_ones_are_not(monkeypatch):
    """With every token's gradient norm equal the weighting is 1 everywhere: the pruned model is exactly the
    --token-weight uniform one. The real gradients choose other channels, and the report says which ran."""
    plain = _prune()
    real = _prune(token_weight="gradient")

    def ones(adapter, ids, **_kw):
        return {i: {r: torch.full(tuple(ids.shape), 3.0) for r in ("o", "down")} for i in range(adapter.n_layers)}

    monkeypatch.setattr("daprune.fisher.token_gradients", ones)
    unit = _prune(token_weight="gradient")
    for a, b in zip(plain.model.state_dict().values(), unit.model.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert any(not torch.equal(a, b) for a, b in zip(plain.model.state_dict().values(),
                                                     real.model.state_dict().values(), strict=True))
    assert real.report["settings"]["token_weight"] == "gradient"
    assert "token_gradients_s" in real.report["timings"]


def test_allowed_where_outputs_are_normalised():
    """The gradient is taken at the linear's own output, through whatever norm follows: Gemma-3's post-norms do not
    refuse it (``residual`` they do)."""
    from test_families import tiny

    res = prune(model=tiny("gemma3_text"), tokenizer=CharTokenizer(), calibration="random", nsamples=4, seqlen=16,
                layers="1:-1", progress=False, sparsity=0.2, token_weight="gradient")
    assert res.report["settings"]["token_weight"] == "gradient"
