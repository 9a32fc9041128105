"""``--error-weight fisher|kfac``: selection's output error weighted by the loss's sensitivity to each output
dimension (fisher), or to the output as a whole through the matrix E[g g^T] (kfac).

The weights are checked against an independent computation of the per-token gradients (a zero tensor added to each
output linear's output, differentiated with ``torch.autograd.grad``); weights of one change nothing; weights that
silence half the output dimensions make selection what it is on the other half alone; settings that would not
read the weights are refused.
"""

from __future__ import annotations

import pytest
import torch
from conftest import CharTokenizer, output_linear_gradients, tiny_model

from daprune.config import PruneConfig
from daprune.errors import ConfigError
from daprune.fisher import OutputWeight, output_fisher, streamed_output_fisher
from daprune.models.adapter import get_adapter

pytestmark = pytest.mark.usefixtures("one_thread")


def _reference(model, adapter, ids: torch.Tensor, full: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """sum over tokens of (dL/dy)^2 (``full``: of dL/dy dL/dy^T), L the summed next-token NLL, by differentiating a
    zero added to each output."""
    grads = output_linear_gradients(model, adapter, ids)
    out: dict[int, dict[str, torch.Tensor]] = {}
    for (i, role), g in grads.items():
        # per token and hidden dimension (OPT's FFN runs on [batch * seq, hidden], the others on [batch, seq, hidden])
        flat = g.double().reshape(-1, g.shape[-1])
        out.setdefault(i, {})[role] = torch.einsum("td,te->de", flat, flat) if full else flat.pow(2).sum(0)
    for roles in out.values():  # the scale output_fisher documents: each role's weights (diagonal) average 1
        for r in roles:
            roles[r] = roles[r] / (torch.diagonal(roles[r]) if full else roles[r]).mean()
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


def test_kfac_matrix_equals_an_independent_gradient_computation():
    """The whole output-side matrix, on the same scale: its diagonal is the fisher weights, its off-diagonal is not
    zero (otherwise kfac could not differ from fisher)."""
    model = tiny_model(layers=2)
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (5, 20), generator=torch.Generator().manual_seed(2))
    want = _reference(model, adapter, ids, full=True)
    got = output_fisher(model, adapter, ids, batch_size=2, progress=False, full=True)
    diag = output_fisher(model, adapter, ids, batch_size=5, progress=False)
    for i in want:
        for role in ("o", "down"):
            torch.testing.assert_close(got[i][role].double(), want[i][role], rtol=1e-4, atol=1e-6)
            torch.testing.assert_close(torch.diagonal(got[i][role]), diag[i][role], rtol=1e-4, atol=1e-7)
            off = want[i][role] - torch.diag(torch.diagonal(want[i][role]))
            assert float(off.abs().max()) > 0.1 * float(torch.diagonal(want[i][role]).max())


def test_output_weight_rows_give_the_loss_estimate_and_undo():
    """||rows(W)[:, j]||^2 = W_j^T G W_j for the matrix and sum_d F_d W_dj^2 for the diagonal; unrows undoes rows."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(12, 12, generator=g, dtype=torch.float64)
    big = a @ a.T + 0.1 * torch.eye(12, dtype=torch.float64)
    w = torch.randn(12, 7, generator=g)
    for weight, energy in ((big, torch.einsum("dj,de,ej->j", w.double(), big, w.double())),
                           (torch.diagonal(big).clone(), (torch.diagonal(big)[:, None] * w.double() ** 2).sum(0))):
        ow = OutputWeight(weight.float() if weight.dim() == 1 else weight)
        torch.testing.assert_close(ow.rows(w).double().pow(2).sum(0), energy, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(ow.unrows(ow.rows(w)), w, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("family", ["mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "gemma3_text", "phi3",
                                    "opt", "gpt2", "gpt_neox"])
def test_every_dense_family_gets_weights_for_every_block(family):
    """Each family's output linears (fused, transposed, post-normed) are the modules its forward runs: every block
    gets weights for both roles, equal to the independent computation (llama is the test above), from the
    whole-model pass and from the block-by-block one that --streaming runs (here through the resident store)."""
    import test_families
    import test_families_extra

    from daprune.stores import ResidentStore

    model = (test_families.tiny(family) if family in test_families.FAMILIES else test_families_extra.tiny(family))
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (3, 16), generator=torch.Generator().manual_seed(2))
    want = _reference(model, adapter, ids)
    got = output_fisher(model, adapter, ids, batch_size=2, progress=False)
    streamed = streamed_output_fisher(adapter, ResidentStore(adapter), ids, batch_size=2, progress=False)
    for weights in (got, streamed):
        assert sorted(weights) == list(range(adapter.n_layers))
        for i in weights:
            for role in ("o", "down"):
                torch.testing.assert_close(weights[i][role].double(), want[i][role].clamp_min(1e-8), rtol=1e-4,
                                           atol=1e-7)


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


@pytest.mark.parametrize("error_weight", ["fisher", "kfac"])
@pytest.mark.parametrize("selection", ["greedy", "obs"])
def test_weights_of_one_change_nothing(monkeypatch, selection, error_weight):
    """With every weight 1 (the identity matrix for kfac) the weighted path must reproduce the uniform prune
    exactly: the same heads, channels and (under OBS) compensated weights, so the weighting, and undoing it, is all
    the setting changes."""
    plain = _prune(tiny_model(), selection=selection)

    def ones(model, adapter, ids, full=False, **_):
        h = adapter.config.hidden_size
        return {i: {r: torch.eye(h) if full else torch.ones(h) for r in ("o", "down")} for i in range(adapter.n_layers)}
    monkeypatch.setattr("daprune.fisher.output_fisher", ones)
    weighted = _prune(tiny_model(), selection=selection, error_weight=error_weight)
    a, b = plain.model.state_dict(), weighted.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert weighted.report["settings"]["error_weight"] == error_weight


def test_real_weights_change_the_prune_and_are_timed():
    plain = _prune(tiny_model())
    runs = {w: _prune(tiny_model(), error_weight=w) for w in ("fisher", "kfac")}
    for other in (plain, runs["fisher"]):  # kfac differs from both: the off-diagonal is read
        for weighted in runs.values():
            if weighted is other:
                continue
            a, b = other.model.state_dict(), weighted.model.state_dict()
            assert any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)
    for weighted in runs.values():
        assert weighted.report["timings"]["fisher_s"] > 0
    assert "fisher_s" not in plain.report["timings"]


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
    got = pruner.ffn_ranking(block, BlockStats(down_in=mom, output_weight={"down": OutputWeight(weight)}),
                             count)[:count].tolist()
    d = block.ffn_out().weight.detach().float()
    assert got == greedy_order(d[: hidden // 2], mom.second, count)
    # the same moments and weight without output weights: a new order, not the previous call's (memoised) one
    assert got != pruner.ffn_ranking(block, BlockStats(down_in=mom), count)[:count].tolist()


def test_fisher_nsamples_takes_the_first_rows(monkeypatch):
    """--fisher-nsamples N: the gradient pass sees exactly the first N scoring rows (the weights equal those of a
    pass over them alone), and the prune differs from one weighted on every row."""
    import daprune.fisher

    seen = []
    real = daprune.fisher.output_fisher

    def spy(model, adapter, ids, **kw):
        seen.append(ids.clone())
        return real(model, adapter, ids, **kw)
    monkeypatch.setattr("daprune.fisher.output_fisher", spy)
    every = _prune(tiny_model(), error_weight="fisher")
    few = _prune(tiny_model(), error_weight="fisher", fisher_nsamples=2)
    assert seen[0].shape[0] == 8 and torch.equal(seen[1], seen[0][:2])
    assert few.report["settings"]["fisher_nsamples"] == 2
    a, b = every.model.state_dict(), few.model.state_dict()
    assert any(a[k].shape != b[k].shape or not torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("settings, message", [
    ({"error_weight": "uniform", "fisher_nsamples": 4}, "with --error-weight uniform there is none"),
    ({"fisher_nsamples": 0}, "--fisher-nsamples must be between 1 and --nsamples"),
    ({"fisher_nsamples": 17}, "--fisher-nsamples must be between 1 and --nsamples \\(16\\)"),
])
def test_bad_fisher_nsamples_is_refused(settings, message):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**{"error_weight": "fisher", **settings}).validate()


@pytest.mark.parametrize("settings, message", [
    ({"ffn_criterion": "wanda-sp"}, "--ffn-criterion wanda-sp does not read"),
    ({"head_criterion": "l1"}, "--head-criterion l1 does not read"),
    ({"schedule": "adaptive"}, "--schedule adaptive"),
    ({"error_weight": "loss"}, "--error-weight must be one of"),
])
@pytest.mark.parametrize("error_weight", ["fisher", "kfac"])
def test_settings_that_would_not_read_the_weights_are_refused(settings, message, error_weight):
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**{"error_weight": error_weight, **settings}).validate()


def test_block_by_block_pass_on_disk_equals_the_whole_model_and_leaves_no_files(tmp_path):
    """The streamed pass with its block inputs and gradients in files (``--activations disk``): the same matrix as
    the whole-model pass (kfac, uneven batches), and every file it wrote is gone afterwards."""
    from daprune.activations import Activations
    from daprune.stores import ResidentStore

    model = tiny_model(layers=3)
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (5, 20), generator=torch.Generator().manual_seed(6))
    want = output_fisher(model, adapter, ids, batch_size=2, progress=False, full=True)
    acts = Activations("disk", torch.device("cpu"), tmp_path / "acts")
    got = streamed_output_fisher(adapter, ResidentStore(adapter, acts), ids, batch_size=2, progress=False, full=True)
    for i in want:
        for role in ("o", "down"):
            torch.testing.assert_close(got[i][role], want[i][role], rtol=1e-4, atol=1e-6)
    assert not list((tmp_path / "acts").iterdir()) and not acts._files


def test_streaming_prune_equals_the_in_memory_one(tmp_path):
    """--streaming with --error-weight fisher (one block in memory, the gradient pass block by block) prunes what the
    in-memory run prunes: the same heads and channels, the same weights up to float rounding."""
    from transformers import AutoModelForCausalLM

    import daprune

    tiny_model().save_pretrained(tmp_path / "src")
    common = dict(sparsity=0.3, calibration="random", nsamples=8, seqlen=24, layers="0:", error_weight="fisher",
                  progress=False)
    streamed = daprune.prune(model=str(tmp_path / "src"), out=str(tmp_path / "o"), streaming=True, **common)
    in_memory = daprune.prune(model=AutoModelForCausalLM.from_pretrained(tmp_path / "src"),
                              tokenizer=CharTokenizer(), **common)
    assert streamed.report["execution"]["streaming"] and streamed.report["timings"]["fisher_s"] > 0
    for a, b in zip(streamed.report["layers"], in_memory.report["layers"], strict=True):
        assert a["kept_heads"] == b["kept_heads"] and a["kept_channels"] == b["kept_channels"]
    state = in_memory.model.state_dict()
    for k, v in streamed.model.state_dict().items():
        torch.testing.assert_close(v, state[k], rtol=1e-4, atol=1e-5)


def _block_moments(seed: int = 0):
    from daprune.stats import Moments

    block = get_adapter(tiny_model()).block(1)
    n = block.n_channels
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(3000, n, generator=g) @ (torch.eye(n) + 0.3 * torch.randn(n, n, generator=g))
    mom = Moments("down_in")
    mom.update(h)
    return block, mom


def _correlated(hidden: int, seed: int = 4) -> torch.Tensor:
    """A G with strong off-diagonal structure: a few output directions dominate the loss."""
    g = torch.Generator().manual_seed(seed)
    u = torch.randn(hidden, 3, generator=g, dtype=torch.float64)
    return (u @ u.T * 5 + torch.eye(hidden, dtype=torch.float64)).float()


def test_kfac_greedy_selects_by_the_matrix():
    """Greedy selection under a full G equals greedy selection on the rows mixed by any factor of G (its Cholesky
    factor here, not the symmetric root the code uses): removal costs W_j^T G W_k are all it may read."""
    from daprune.criteria.base import get_criterion
    from daprune.pipeline import BlockPruner
    from daprune.selection import greedy_order
    from daprune.stats import BlockStats

    block, mom = _block_moments()
    d = block.ffn_out().weight.detach().float()
    big = _correlated(d.shape[0])
    pruner = BlockPruner(PruneConfig(selection="greedy"), get_criterion("second-moment"), None, 0.0)
    count = block.n_channels // 2
    got = pruner.ffn_ranking(block, BlockStats(down_in=mom, output_weight={"down": OutputWeight(big)}),
                             count)[:count].tolist()
    chol = torch.linalg.cholesky(big.double())
    assert got == greedy_order((chol.T @ d.double()).float(), mom.second, count)
    assert got != greedy_order(d * torch.diagonal(big).sqrt()[:, None], mom.second, count)  # not the diagonal's


def test_kfac_obs_compensation_is_the_least_squares_one():
    """OBS on rows mixed by G^(1/2), mixed back: the kept columns equal the plain damped least-squares compensation
    of the removed ones, W_k + W_r H_rk H_kk^-1 (computed here directly), whatever G chose."""
    from daprune.criteria.base import get_criterion
    from daprune.pipeline import BlockPruner
    from daprune.selection import obs_ranking

    block, mom = _block_moments(5)
    d = block.ffn_out().weight.detach().float()
    ow = OutputWeight(_correlated(d.shape[0]))
    pruner = BlockPruner(PruneConfig(), get_criterion("second-moment"), None, 0.0)
    second = pruner.energy(mom)
    count = block.n_channels // 3
    order, w = obs_ranking(ow.rows(d), second, count)
    got = ow.unrows(w)
    removed, kept = order[:count], torch.sort(order[count:]).values
    h = second.double() + 1e-2 * torch.diagonal(second.double()).mean() * torch.eye(second.shape[0],
                                                                                       dtype=torch.float64)
    want = d.double()[:, kept] + d.double()[:, removed] @ h[removed][:, kept] @ torch.linalg.inv(h[kept][:, kept])
    torch.testing.assert_close(got[:, kept].double(), want, rtol=1e-3, atol=1e-4)
    assert float(got[:, removed].abs().max()) < 1e-4
