"""``--error-weight fisher``: selection's output error weighted per output dimension by the loss's sensitivity.

The weights are checked against an independent computation of the per-token gradients (a zero tensor added to each
output linear's output, differentiated with ``torch.autograd.grad``); weights of one change nothing; weights that
silence half the output dimensions make selection what it is on the other half alone; settings that would not
read the weights are refused.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import CharTokenizer, tiny_model

from daprune.config import PruneConfig
from daprune.errors import ConfigError
from daprune.fisher import output_fisher
from daprune.models.adapter import get_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, adapter, ids: torch.Tensor) -> dict[int, dict[str, torch.Tensor]]:
    """sum over tokens of (dL/dy)^2, L the summed next-token NLL, by differentiating a zero added to each output."""
    zeros: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i in range(adapter.n_layers):
        b = adapter.block(i)
        for role, mod in (("o", b.attn_out()), ("down", b.ffn_out())):
            def add_zero(_m, _inp, out, key=(i, role)):
                zeros[key] = torch.zeros_like(out, requires_grad=True)
                return out + zeros[key]
            hooks.append(mod.register_forward_hook(add_zero))
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum")
            keys = list(zeros)
            grads = torch.autograd.grad(loss, [zeros[k] for k in keys])
    finally:
        for h in hooks:
            h.remove()
    out: dict[int, dict[str, torch.Tensor]] = {}
    for (i, role), g in zip(keys, grads, strict=True):
        # per token and hidden dimension (OPT's FFN runs on [batch * seq, hidden], the others on [batch, seq, hidden])
        out.setdefault(i, {})[role] = g.double().reshape(-1, g.shape[-1]).pow(2).sum(0)
    for roles in out.values():  # the scale output_fisher documents: each role's weights average 1
        for r in roles:
            roles[r] = roles[r] / roles[r].mean()
    return out


def test_weights_equal_an_independent_gradient_computation_in_any_batch_size():
    model = tiny_model(layers=3)
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (5, 20), generator=torch.Generator().manual_seed(1))
    want = _reference(model, adapter, ids)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for batch in (5, 2):  # one batch, and uneven batches (2 + 2 + 1)
        got = output_fisher(model, adapter, ids, batch_size=batch, progress=False)
        assert sorted(got) == [0, 1, 2]
        for i in got:
            for role in ("o", "down"):
                torch.testing.assert_close(got[i][role].double(), want[i][role], rtol=1e-4, atol=1e-7)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    # not uniform: otherwise the setting could not change anything
    assert max(float(w["down"].max() / w["down"].min()) for w in want.values()) > 2


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "gemma3_text", "phi3",
                                    "opt", "gpt2", "gpt_neox"])
def test_every_dense_family_gets_weights_for_every_block(family):
    """Each family's output linears (fused, transposed, post-normed) are the modules its forward runs: every block
    gets weights for both roles, equal to the independent computation (llama is the test above)."""
    import test_families
    import test_families_extra

    model = (test_families.tiny(family) if family in test_families.FAMILIES else test_families_extra.tiny(family))
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    got = output_fisher(model, adapter, ids, batch_size=2, progress=False)
    want = _reference(model, adapter, ids)
    assert sorted(got) == list(range(adapter.n_layers))
    for i in got:
        for role in ("o", "down"):
            torch.testing.assert_close(got[i][role].double(), want[i][role].clamp_min(1e-8), rtol=1e-4, atol=1e-7)


def test_an_output_linear_the_forward_never_runs_is_refused(monkeypatch):
    """If an adapter named a module that the model's forward does not call, no weight would reach that block and
    selection there would silently stay unweighted: refused instead."""
    model = tiny_model(layers=2)
    adapter = get_adapter(model)
    block = adapter.block(1)
    idle, real = torch.nn.Linear(4, 4), type(block).ffn_out
    monkeypatch.setattr(type(block), "ffn_out", lambda self: idle if self.index == 1 else real(self))
    with pytest.raises(ConfigError, match="no gradient reached block 1 down"):
        output_fisher(model, adapter, torch.randint(0, 128, (2, 8)), progress=False)


def _prune(model, **kw):
    from daprune.api import prune

    settings = dict(calibration="random", nsamples=8, seqlen=24, layers="0:", sparsity=0.3, batch_size=4,
                    progress=False)
    return prune(model=model, tokenizer=CharTokenizer(), **{**settings, **kw})


@pytest.mark.parametrize("selection", ["greedy", "obs"])
def test_weights_of_one_change_nothing(monkeypatch, selection):
    """With every weight 1 the fisher path must reproduce the uniform prune exactly: the same heads, channels and
    (under OBS) compensated weights, so the weighting, and dividing it back out, is all the setting changes."""
    plain = _prune(tiny_model(), selection=selection)
    ones = lambda model, adapter, ids, **_: {  # noqa: E731
        i: {"o": torch.ones(adapter.config.hidden_size), "down": torch.ones(adapter.config.hidden_size)}
        for i in range(adapter.n_layers)}
    monkeypatch.setattr("daprune.fisher.output_fisher", ones)
    weighted = _prune(tiny_model(), selection=selection, error_weight="fisher")
    a, b = plain.model.state_dict(), weighted.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert weighted.report["settings"]["error_weight"] == "fisher"


def test_real_weights_change_the_prune_and_are_timed():
    plain = _prune(tiny_model())
    weighted = _prune(tiny_model(), error_weight="fisher")
    a, b = plain.model.state_dict(), weighted.model.state_dict()
    assert any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)
    assert weighted.report["timings"]["fisher_s"] > 0 and "fisher_s" not in plain.report["timings"]


def test_silenced_dimensions_leave_selection_to_the_others():
    """Weights ~0 on half the output dimensions: greedy selection is then greedy selection on the other rows of
    down_proj alone (computed directly), and it differs from the unweighted choice."""
    from daprune.criteria.base import get_criterion
    from daprune.pipeline import BlockPruner
    from daprune.selection import greedy_order
    from daprune.stats import BlockStats, Moments

    block = get_adapter(tiny_model()).block(1)
    n, hidden = block.n_channels, block.ffn_out().weight.shape[0]
    g = torch.Generator().manual_seed(0)
    h = torch.randn(3000, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    mom = Moments("down_in")
    mom.update(h)
    weight = torch.full((hidden,), 1e-8)
    weight[: hidden // 2] = 1.0
    pruner = BlockPruner(PruneConfig(selection="greedy"), get_criterion("second-moment"), None, 0.0)
    count = n // 2
    got = pruner.ffn_ranking(block, BlockStats(down_in=mom, output_weight={"down": weight}), count)[:count].tolist()
    d = block.ffn_out().weight.detach().float()
    assert got == greedy_order(d[: hidden // 2], mom.second, count)
    # the same moments and weight without output weights: a new order, not the previous call's (memoised) one
    assert got != pruner.ffn_ranking(block, BlockStats(down_in=mom), count)[:count].tolist()


@pytest.mark.parametrize("settings, message", [
    ({"ffn_criterion": "wanda-sp"}, "--ffn-criterion wanda-sp does not read"),
    ({"head_criterion": "l1"}, "--head-criterion l1 does not read"),
    ({"schedule": "adaptive"}, "--schedule adaptive"),
    ({"error_weight": "loss"}, "--error-weight must be one of"),
])
def test_settings_that_would_not_read_the_weights_are_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**{"error_weight": "fisher", **settings}).validate()


def test_streaming_is_refused_and_auto_falls_back_to_memory(tmp_path):
    import daprune

    tiny_model().save_pretrained(tmp_path / "src")
    common = dict(model=str(tmp_path / "src"), sparsity=0.2, calibration="random", nsamples=8, seqlen=24, layers="0:",
                  error_weight="fisher", progress=False)
    with pytest.raises(ConfigError, match="--error-weight fisher needs gradients of the whole model"):
        daprune.prune(out=str(tmp_path / "o"), streaming=True, **common)
    assert not (tmp_path / "o").exists()
    res = daprune.prune(out=str(tmp_path / "p"), **common)  # auto: in memory
    assert res.report["settings"]["error_weight"] == "fisher" and (tmp_path / "p" / "report.json").is_file()
