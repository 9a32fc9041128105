"""``--token-weight``: residual (1 / the residual stream's mean square), first (a fixed share for position 0)."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from conftest import CharTokenizer, tiny_model

from daprune.api import prune
from daprune.models.adapter import get_adapter


def _collect(token_weight: str, x: torch.Tensor, **extra):
    from daprune.block_ops import copy_block
    from daprune.config import PruneConfig
    from daprune.criteria.base import get_criterion
    from daprune.pipeline import BlockPruner
    from daprune.stores import ResidentStore

    adapter = get_adapter(tiny_model())
    ctx = ResidentStore(adapter).layer_inputs(x.shape[1])[1]
    block = adapter.block(1)
    cfg = PruneConfig(token_weight=token_weight, nsamples=x.shape[0], batch_size=3, **extra)
    pruner = BlockPruner(cfg, get_criterion("second-moment"), None, 0.0)
    return block, ctx, pruner.collect(block, copy_block(block), x, x, ctx, {"o_in": True, "down_in": False})


def _stream() -> torch.Tensor:
    """A residual stream whose first token per row is 40x the rest (an attention sink's)."""
    x = torch.randn(5, 12, 48, generator=torch.Generator().manual_seed(0))
    x[:, 0] *= 40
    x[2, 5] *= 7
    return x


def test_statistics_are_the_weighted_sums(one_thread):
    """Gram and cross terms equal sum_t w_t x_t x_t^T and sum_t w_t x_t y_t^T with w_t = 1 / mean(h_t^2) scaled to
    mean 1, computed here in numpy from the block's unweighted linear inputs and outputs."""
    from daprune.hooks import capture

    x = _stream()
    block, ctx, m = _collect("residual", x)
    with torch.no_grad(), capture({"o": block.attn_out()}) as got:
        block.forward(x, ctx)
    o_in = got["o"][0].double().numpy().reshape(-1, 48)
    o_out = got["o"][1].double().numpy().reshape(-1, 48)
    w = 1.0 / (x.double().numpy() ** 2).mean(-1).reshape(-1)
    w /= w.mean()
    np.testing.assert_allclose(m["o_in"].gram.double().numpy(), (o_in * w[:, None]).T @ o_in, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(m["o_in"].cross.double().numpy(), (o_in * w[:, None]).T @ o_out, rtol=2e-4,
                               atol=1e-5)
    assert w[0] < 1e-2  # the sink token counts for almost nothing ...
    _, _, plain = _collect("uniform", x)
    sink = (o_in.reshape(5, 12, 48)[:, 0] ** 2).sum() / (o_in ** 2).sum()
    assert sink > 0.05  # ... while it holds a real share of the unweighted energy
    assert not torch.allclose(plain["o_in"].gram, m["o_in"].gram, rtol=1e-2)


def test_equal_token_norms_change_nothing(one_thread):
    """Where every token's residual stream has the same mean square, the weights are all 1: same statistics."""
    x = _stream()
    x = x / x.pow(2).mean(-1, keepdim=True).sqrt()
    _, _, weighted = _collect("residual", x)
    _, _, plain = _collect("uniform", x)
    for role in ("o_in", "down_in"):
        torch.testing.assert_close(weighted[role].gram, plain[role].gram, rtol=1e-5, atol=1e-5)


def test_end_to_end_changes_the_choice_and_is_recorded(one_thread):
    def run(token_weight):
        return prune(model=tiny_model(), tokenizer=CharTokenizer(), calibration="random", nsamples=8, seqlen=32,
                     layers="1:-1", batch_size=4, progress=False, sparsity=0.3, token_weight=token_weight)

    plain, weighted = run("uniform"), run("residual")
    assert weighted.report["settings"]["token_weight"] == "residual"
    changed = [k for k, v in plain.model.state_dict().items() if not torch.equal(v, weighted.model.state_dict()[k])]
    assert changed


@pytest.mark.parametrize("extra", [dict(compensate_mean=True), dict(ffn_criterion="flap", head_criterion="flap"),
                                   dict(ffn_criterion="paper", selection="score")])
def test_refused_where_it_would_not_mean_what_it_says(extra):
    from daprune.config import PruneConfig
    from daprune.errors import ConfigError

    with pytest.raises(ConfigError, match="--token-weight"):
        PruneConfig(token_weight="residual", **extra).validate()


def test_refused_where_block_outputs_are_normalised_before_the_residual_add(one_thread):
    """Gemma-3 RMS-normalises each sublayer's output before adding it: the residual's norm is not what scales
    an output error there (measured: every column worse on Gemma-3-270M), so the setting is refused up front."""
    from test_families import tiny

    from daprune.errors import ConfigError

    with pytest.raises(ConfigError, match="--token-weight residual .* normalises them first"):
        prune(model=tiny("gemma3_text"), tokenizer=CharTokenizer(), calibration="random", nsamples=4, seqlen=16,
              layers="1:-1", progress=False, sparsity=0.2, token_weight="residual")


@pytest.mark.parametrize("share", [None, 0.5])
def test_first_position_statistics_are_the_weighted_sums(one_thread, share):
    """--token-weight first: the Gram equals numpy's sum with w = (seq - 1) share / (1 - share) at each row's first
    position (share 0.2 by default; 0.5: as much as the row's other positions together) and 1 elsewhere, scaled to
    mean 1, from the block's own unweighted linear inputs."""
    from daprune.hooks import capture

    x = _stream()
    block, ctx, m = _collect("first", x, first_token_share=share)
    with torch.no_grad(), capture({"d": block.ffn_out()}) as got:
        block.forward(x, ctx)
    rows, seq = x.shape[:2]
    d_in = got["d"][0].double().numpy().reshape(-1, got["d"][0].shape[-1])
    w = np.ones((rows, seq))
    want = 0.2 if share is None else share  # the documented default
    w[:, 0] = (seq - 1) * want / (1 - want)
    w = (w / w.mean()).reshape(-1)
    np.testing.assert_allclose(m["down_in"].gram.double().numpy(), (d_in * w[:, None]).T @ d_in, rtol=2e-4,
                               atol=1e-5)
    first = (w.reshape(rows, seq)[:, 0]).sum() / w.sum()
    assert abs(first - want) < 1e-9
    _, _, plain = _collect("uniform", x)
    assert not torch.allclose(plain["down_in"].gram, m["down_in"].gram, rtol=1e-2)


def test_first_position_weight_keeps_the_first_token_closer(one_thread):
    """With every row starting with the same token (BOS per window), weighting the first position leaves the pruned
    block's output there closer to the dense one than the unweighted prune of the same size does, measured on the
    model's own hidden states; the other positions pay for it."""
    from daprune.config import PruneConfig
    from daprune.pipeline import run_pipeline

    dense = tiny_model()
    ids = torch.randint(2, 128, (16, 32), generator=torch.Generator().manual_seed(3))
    ids[:, 0] = 1
    with torch.no_grad():
        want = dense(ids, output_hidden_states=True).hidden_states[3]

    def errors(token_weight):
        model = copy.deepcopy(dense)
        cfg = PruneConfig(sparsity=0.05, layers="2:3", nsamples=16, seqlen=32, batch_size=4, token_weight=token_weight,
                          head_criterion="none")
        run_pipeline(get_adapter(model), ids, cfg, progress=False)
        with torch.no_grad():
            got = model(ids, output_hidden_states=True).hidden_states[3]
        err = (got - want).pow(2).sum(-1)
        return float(err[:, 0].mean()), float(err[:, 1:].mean())

    plain_first, plain_rest = errors("uniform")
    first, rest = errors("first")
    assert first < 0.5 * plain_first
    assert rest > plain_rest


def test_first_position_weight_is_allowed_where_outputs_are_normalised(one_thread):
    """Unlike ``residual``, ``first`` does not read the residual's norm, so Gemma-3's post-norms do not refuse it."""
    from test_families import tiny

    res = prune(model=tiny("gemma3_text"), tokenizer=CharTokenizer(), calibration="random", nsamples=4, seqlen=16,
                layers="1:-1", progress=False, sparsity=0.2, token_weight="first")
    assert res.report["settings"]["token_weight"] == "first"


@pytest.mark.parametrize("extra", [dict(first_token_share=0.3), dict(token_weight="residual", first_token_share=0.3),
                                   dict(token_weight="first", first_token_share=1.0)])
def test_first_token_share_refused_where_it_would_be_ignored_or_is_out_of_range(extra):
    from daprune.config import PruneConfig
    from daprune.errors import ConfigError

    with pytest.raises(ConfigError, match="--first-token-share"):
        PruneConfig(**extra).validate()


@pytest.mark.parametrize("mode", ["residual", "first", "gradient"])
def test_refused_for_experts(one_thread, mode):
    from test_moe import tiny as tiny_moe

    from daprune.errors import ConfigError

    with pytest.raises(ConfigError, match=f"--token-weight {mode} .* experts"):
        prune(model=tiny_moe("mixtral"), tokenizer=CharTokenizer(), calibration="random", nsamples=4, seqlen=16,
              layers="1:3", progress=False, sparsity=0.2, token_weight=mode)


def test_a_factor_that_does_not_fit_the_rows_is_an_error():
    """Flat rows (OPT's FFN capture before ``_as_rows``) would otherwise broadcast or take the wrong tokens' factors."""
    from daprune.token_weight import scaled

    gen = torch.Generator().manual_seed(5)
    rows, f = torch.randn(3, 5, 4, generator=gen), torch.rand(3, 5, generator=gen)
    torch.testing.assert_close(scaled(rows, f), rows * f[..., None])
    with pytest.raises(ValueError, match="does not match"):
        scaled(rows.reshape(15, 4), f)


@pytest.mark.parametrize("mode", ["residual", "first", "gradient"])
def test_every_token_weight_runs_where_the_ffn_flattens_tokens(one_thread, mode):
    """A regression: on OPT (FFN on flattened tokens) every token weight used to fail on shape; now each prunes."""
    from test_families import tiny

    res = prune(model=tiny("opt"), tokenizer=CharTokenizer(), calibration="random", nsamples=8, seqlen=16,
                layers="1:-1", batch_size=4, progress=False, sparsity=0.2, token_weight=mode)
    assert res.report["settings"]["token_weight"] == mode


def test_flattened_ffn_statistics_are_the_weighted_sums(one_thread):
    """On OPT's block (FFN on [batch * seq, hidden]) the FFN Gram under --token-weight first equals numpy's sum with
    the first position's weight, from the block's own unweighted fc2 inputs."""
    from test_families import tiny

    from daprune.block_ops import copy_block
    from daprune.config import PruneConfig
    from daprune.criteria.base import get_criterion
    from daprune.hooks import capture
    from daprune.pipeline import BlockPruner
    from daprune.stores import ResidentStore

    adapter = get_adapter(tiny("opt"))
    block = adapter.block(1)
    x = torch.randn(5, 12, adapter.config.hidden_size, generator=torch.Generator().manual_seed(6))
    ctx = ResidentStore(adapter).layer_inputs(x.shape[1])[1]
    pruner = BlockPruner(PruneConfig(token_weight="first", first_token_share=0.5, nsamples=5, batch_size=3),
                         get_criterion("second-moment"), None, 0.0)
    m = pruner.collect(block, copy_block(block), x, x, ctx, {"down_in": False})
    with torch.no_grad(), capture({"d": block.ffn_out()}) as got:
        block.forward(x, ctx)
    d_in = got["d"][0].double().numpy()
    assert d_in.shape[0] == 60  # flattened tokens: the case under test
    w = np.ones((5, 12))
    w[:, 0] = 11.0  # share 0.5: the first position weighs as much as the other 11 together
    w = (w / w.mean()).reshape(-1)
    np.testing.assert_allclose(m["down_in"].gram.double().numpy(), (d_in * w[:, None]).T @ d_in, rtol=2e-4,
                               atol=1e-5)
