"""A pruned block's stream output formed from its last statistics pass (daprune.replay) equals running the block
again: per family against the block's own forward, and end to end against a pipeline that re-runs every block."""

from __future__ import annotations

import pytest
import torch
from conftest import CharTokenizer, tiny_model
from test_families import FAMILIES as LLAMA_SHAPED
from test_families import tiny as tiny_llama_shaped
from test_families_extra import canonical
from test_families_extra import tiny as tiny_other

import daprune
from daprune.hooks import capture
from daprune.models import adapter as adapter_module
from daprune.replay import FFNReplay
from daprune.stores import ResidentStore

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(family: str):
    if family == "opt-post-ln":
        model = tiny_other("opt")
        for layer in model.model.decoder.layers:
            layer.do_layer_norm_before = False
        return model
    return tiny_llama_shaped(family) if family in LLAMA_SHAPED else tiny_other(family)


@pytest.mark.parametrize("family", [*LLAMA_SHAPED, "phi3", "opt", "gpt2", "gpt_neox", "opt-post-ln"])
def test_replayed_output_equals_the_blocks_own_forward(family):
    """Slice channels, change the kept level-2 weights and add a bias after the pass: the replayed output is the
    block's forward on the same input (Gemma-2/3's post-FFN norm and Granite's residual multiplier included)."""
    model = _model(family)
    adapter = canonical(model)
    store = ResidentStore(adapter)
    ids = torch.randint(3, 128, (3, 12), generator=torch.Generator().manual_seed(2))
    contexts = store.layer_inputs(ids.shape[1])
    with torch.no_grad():
        h = adapter.block(0).forward(store.embed(ids, 3), contexts[0])
    block, ctx = adapter.block(1), contexts[1]
    replay = FFNReplay()
    with torch.no_grad():
        for rows in (slice(0, 2), slice(2, 3)):  # two batches, as the pipeline's pass has
            with capture({"down": block.ffn_out()}) as got:
                y = block.forward(h[rows], ctx)
            replay.add(y, *got["down"])
        replay.snapshot(block.ffn_out())
        keep = torch.tensor([c for c in range(block.n_channels) if c % 3])
        block.slice_ffn(keep.tolist())  # plain removal: only the removed channels' contribution goes
        removed_only = replay.output(block, keep)
        expected = block.forward(h, ctx)
        g = torch.Generator().manual_seed(3)  # then compensation moves the kept columns and adds a bias
        block.ffn_out().weight.add_(0.1 * torch.randn(block.ffn_out().weight.shape, generator=g))
        block.add_output_bias("mlp", torch.randn(block.ffn_out().out_features, generator=g))
        moved = replay.output(block, keep)
        if family == "opt-post-ln":  # LayerNorm after the residual sum: no additive change to form
            assert removed_only is None and moved is None
            return
        torch.testing.assert_close(removed_only, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(moved, block.forward(h, ctx), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(moved, expected, rtol=1e-3, atol=1e-3)  # the second change did change it


def _prune(**kw):
    settings = dict(sparsity=0.3, calibration="random", nsamples=8, seqlen=32, layers="1:-1", batch_size=4,
                    progress=False)
    settings.update(kw)
    return daprune.prune(model=tiny_model(), tokenizer=CharTokenizer(), **settings)


@pytest.mark.parametrize("kw", [{}, {"selection": "obs"}, {"recovery": "paper", "nsamples": 32},
                                {"recovery": "heldout", "heldout_nsamples": 4},
                                {"recovery": "post", "recovery_nsamples": 32},
                                {"ffn_criterion": "flap", "head_criterion": "flap"}],
                         ids=["greedy", "obs", "paper-remedy", "heldout-recovery", "refit-rows", "flap-bias"])
def test_pipeline_with_replay_prunes_as_one_that_reruns_every_block(kw, monkeypatch):
    """Same choices, the same weights up to float rounding, one block forward fewer per pruned block."""
    calls = []
    real = adapter_module.layer_call

    def counting(layer, hidden, ctx):
        calls.append(hidden.shape[0])
        return real(layer, hidden, ctx)

    monkeypatch.setattr(adapter_module, "layer_call", counting)
    fast = _prune(**kw)
    rows_fast = sum(calls)
    calls.clear()
    monkeypatch.setattr("daprune.pipeline.REPLAY_MAX_BYTES", 0)  # too little memory for a replay: re-run
    slow = _prune(**kw)
    rows_slow = sum(calls)

    pruned = [r for r in slow.report["layers"] if r["pruned"]]
    assert len(pruned) == 4
    for a, b in zip(fast.report["layers"], slow.report["layers"], strict=True):
        assert (a["kept_heads"], a["kept_channels"], a["plan"]) == (b["kept_heads"], b["kept_channels"], b["plan"])
        assert a["error"] == pytest.approx(b["error"], rel=1e-4, abs=1e-7)
    sd_fast, sd_slow = fast.model.state_dict(), slow.model.state_dict()
    assert sd_fast.keys() == sd_slow.keys()
    for k, v in sd_slow.items():  # gate/up rows are the dense ones: equal weights there mean the same channels
        if kw.get("recovery") == "paper" and k.endswith("o_proj.weight"):
            continue  # o_in of a GQA block is near rank-deficient: rounding moves the re-fit along its null space
        torch.testing.assert_close(sd_fast[k], v, rtol=1e-4, atol=1e-5)
    ids = torch.randint(0, 128, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(fast.model(ids).logits, slow.model(ids).logits, rtol=1e-4, atol=1e-4)
    stream_rows = kw.get("recovery_nsamples") or kw.get("nsamples", 8)  # extra re-fit rows travel with the stream
    stream_rows += kw.get("heldout_nsamples", 0)
    assert rows_slow - rows_fast == len(pruned) * stream_rows  # each pruned block's stream forward, saved
