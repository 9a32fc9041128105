"""Small hand-checkable examples for recovery, JS divergence, head selection and the schedule."""

from __future__ import annotations

import math

import torch
from conftest import tiny_model

from daprune.criteria.similarity import JSAccumulator, algorithm2, js_rows, select_heads
from daprune.models.adapter import get_adapter
from daprune.recovery import objective, ridge_solve
from daprune.schedule import candidate_plans, channel_params, head_unit_params
from daprune.stats import Moments
from daprune.stores import ResidentStore


def test_ridge_solve_recovers_exact_linear_map():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 4, generator=g)
    w_true = torch.randn(3, 4, generator=g)
    m = Moments()
    m.update(x, x @ w_true.T)
    w, info = ridge_solve(m.second, m.cross_mean, damp=1e-8)
    torch.testing.assert_close(w, w_true, rtol=1e-4, atol=1e-4)
    assert info.escalations == 0


def test_ridge_solve_lowers_objective_on_4x3():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(50, 4, generator=g)
    y = torch.randn(50, 3, generator=g)
    m = Moments()
    m.update(x, y)
    y2 = float(y.pow(2).sum() / 50)
    w0 = torch.randn(3, 4, generator=g)
    w, _ = ridge_solve(m.second, m.cross_mean)
    assert objective(m.second, m.cross_mean, y2, w) < objective(m.second, m.cross_mean, y2, w0)
    direct = torch.linalg.lstsq(x, y).solution.T
    torch.testing.assert_close(w, direct, rtol=1e-3, atol=1e-3)


def test_ridge_escalates_on_singular_gram():
    gram = torch.diag(torch.tensor([1.0, 1.0, -0.5]))  # indefinite: Cholesky fails until damping dominates
    _, info = ridge_solve(gram, torch.zeros(3, 2), damp=1e-4)
    assert info.escalations == 5 and math.isclose(info.damp, 10.0, rel_tol=1e-6)  # 0.5 + 0.5*damp > 0


def test_ridge_prior_original_shrinks_toward_it():
    gram = torch.eye(2) * 1e-6
    prior = torch.tensor([[1.0, 2.0]])
    w, _ = ridge_solve(gram, torch.zeros(2, 1), damp=1e3, prior=prior)
    torch.testing.assert_close(w, prior, rtol=1e-3, atol=1e-3)


def test_ridge_with_prior_is_the_minimiser_on_raw_data():
    """At a moderate ridge the solution minimises mean||x W^T - y||^2 + lambda ||W - prior||^2 written on the raw
    rows (lambda = damp * mean E[x_j^2]): autograd's gradient there is zero and any perturbation costs more."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(40, 5, generator=g, dtype=torch.float64) + 0.3
    y = torch.randn(40, 3, generator=g, dtype=torch.float64)
    prior = torch.randn(3, 5, generator=g, dtype=torch.float64)
    m = Moments()
    m.update(x.float(), y.float())
    damp = 0.3
    w, _ = ridge_solve(m.second, m.cross_mean, damp=damp, prior=prior.float())
    lam = damp * float(x.pow(2).mean())

    def loss(v: torch.Tensor) -> torch.Tensor:
        return (x @ v.T - y).pow(2).sum(1).mean() + lam * (v - prior).pow(2).sum()

    v = w.double().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss(v), v)
    assert float(grad.abs().max()) < 1e-4
    for _ in range(5):
        step = 1e-2 * torch.randn(3, 5, generator=g, dtype=torch.float64)
        assert float(loss(w.double() + step)) > float(loss(w.double()))


def test_js_divergence_bounds():
    p = torch.tensor([[0.5, 0.5, 0.0]])
    assert float(js_rows(p, p)) == 0.0
    q = torch.tensor([[0.0, 0.0, 1.0]])
    assert math.isclose(float(js_rows(p, q)), math.log(2), rel_tol=1e-6)
    # hand value: P=(1,0), Q=(.5,.5): JS = .5*KL(P||M) + .5*KL(Q||M), M=(.75,.25)
    p2, q2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.5, 0.5]])
    want = 0.5 * math.log(1 / 0.75) + 0.5 * (0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25))
    assert math.isclose(float(js_rows(p2, q2)), want, rel_tol=1e-6)


def _js_reference(p: torch.Tensor, q: torch.Tensor) -> float:
    """JS(P||Q) averaged over every (sample, query) row, written out in float64 with plain loops."""
    total, rows = 0.0, 0
    for a, b in zip(p.double().reshape(-1, p.shape[-1]), q.double().reshape(-1, q.shape[-1]), strict=True):
        js = 0.0
        for pi, qi in zip(a.tolist(), b.tolist(), strict=True):
            mi = 0.5 * (pi + qi)
            js += 0.5 * (pi * math.log(pi / mi) if pi > 0 else 0.0) + 0.5 * (qi * math.log(qi / mi) if qi > 0 else 0.0)
        total, rows = total + js, rows + 1
    return total / rows


def test_js_accumulator_mean_over_rows():
    probs = torch.softmax(3 * torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0)), -1)
    probs[1, 2, 0] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # a causal-style row with exact zeros
    acc = JSAccumulator(3)
    acc.update(probs[:1])
    acc.update(probs[1:])  # batches of different content: the mean is over all rows, not over batches
    for i, j in [(0, 1), (0, 2), (1, 2)]:
        want = _js_reference(probs[:, i], probs[:, j])
        assert math.isclose(float(acc.divergence[i, j]), want, rel_tol=1e-5), (i, j)
    assert torch.equal(acc.divergence, acc.divergence.T)
    assert float(acc.divergence[1, 1]) == 0.0


def test_algorithm2_and_gqa_selection():
    d = torch.tensor([[0.0, 0.01, 0.5, 0.5], [0.01, 0.0, 0.5, 0.02], [0.5, 0.5, 0.0, 0.5], [0.5, 0.02, 0.5, 0.0]])
    imp = torch.tensor([4.0, 1.0, 3.0, 2.0])
    # pair (0,1) first: prune 1 (less important); pair (1,3) skipped because 1 is chosen
    assert algorithm2(d, tau=0.1, importance=imp) == [1]
    assert algorithm2(d, tau=0.001, importance=imp) == []
    groups = [[0, 1], [2, 3]]
    assert select_heads(groups, 1, imp, redundant=[1]) == [1, 3]
    assert select_heads(groups, 0, imp) == []


def test_attention_probs_match_eager_attention():
    """The probabilities the head criterion reads are the ones the model's eager attention returns."""
    model = tiny_model()
    model.config._attn_implementation = "eager"
    ids = torch.randint(0, 128, (2, 10))
    out = model(ids, output_attentions=True)
    model.config._attn_implementation = "sdpa"
    adapter = get_adapter(model)
    store = ResidentStore(adapter)
    hidden, ctx = store.embed(ids, 2), store.layer_inputs(10)
    probs: list[torch.Tensor] = []
    adapter.block(0).forward(hidden, ctx[0], probs)
    torch.testing.assert_close(probs[0], out.attentions[0].float(), rtol=1e-5, atol=1e-5)
    assert model.config._attn_implementation == "sdpa"  # switched back after reading the probabilities


def test_block_forward_matches_model():
    model = tiny_model()
    ids = torch.randint(0, 128, (2, 10))
    adapter = get_adapter(model)
    store = ResidentStore(adapter)
    h, ctx = store.embed(ids, 2), store.layer_inputs(10)
    for i in range(adapter.n_layers):
        h = adapter.block(i).forward(h, ctx[i])
    ref = model(ids, output_hidden_states=True).hidden_states[-1]
    torch.testing.assert_close(model.model.norm(h), ref, rtol=1e-5, atol=1e-5)


def test_parameter_accounting():
    model = tiny_model()  # hidden 48, 6 heads (hd 8), 2 kv, inter 96
    block = get_adapter(model).block(0)
    assert channel_params(block) == 3 * 48
    assert head_unit_params(block) == 2 * (8 * 48 + 48 * 8)
    plans = candidate_plans(block, target=1000.0)
    assert [p.heads_per_group for p in plans] == [0, 1, 2]  # group size 3: up to 2 heads per group
    assert all(p.params >= 1000 for p in plans)
    assert plans[0].channels == math.ceil(1000 / 144)


def _output_error(d, second, removed):
    r = list(removed)
    return float(torch.einsum("oi,ij,oj->", d[:, r], second[r][:, r], d[:, r])) if r else 0.0


def test_greedy_selection_uses_correlations():
    """Two duplicate channels each look cheap, but removing both costs 4x one of them (not 2x)."""
    import itertools

    from daprune.selection import greedy_order

    g = torch.Generator().manual_seed(0)
    h = torch.randn(4000, 6, generator=g)
    h[:, 1] = h[:, 0]
    u = torch.nn.functional.normalize(torch.randn(4, generator=g), dim=0)
    d = torch.stack([u * s for s in (1.0, 1.0, 1.2, 2.0, 2.5, 3.0)], 1)
    second = h.T @ h / 4000
    order = greedy_order(d, second, 2)
    best = min(_output_error(d, second, r) for r in itertools.combinations(range(6), 2))
    assert math.isclose(_output_error(d, second, order), best, rel_tol=1e-5)
    assert 2 in order
    by_score = torch.argsort(d.pow(2).sum(0) * torch.diagonal(second))[:2].tolist()
    assert sorted(by_score) == [0, 1]
    assert _output_error(d, second, order) < 0.7 * _output_error(d, second, by_score)
    assert greedy_order(d, second, 4)[:2] == order  # removal order: every prefix is the greedy choice


def test_obs_compensation_equals_least_squares_refit():
    from daprune.selection import obs_order

    g = torch.Generator().manual_seed(2)
    h = torch.randn(300, 8, generator=g)
    d = torch.randn(5, 8, generator=g)
    second = h.T @ h / 300
    for steps in (1, 3):
        order, w = obs_order(d, second, 3, damp=1e-9, steps=steps)
        keep = [i for i in range(8) if i not in order]
        refit = torch.linalg.lstsq(h[:, keep], h @ d.T).solution.T
        torch.testing.assert_close(w[:, keep], refit, rtol=1e-4, atol=1e-4)
        assert w[:, order].abs().max() < 1e-6


def _raw_ridge(x: torch.Tensor, y: torch.Tensor, prior: torch.Tensor | None, damp: float) -> torch.Tensor:
    """argmin_W mean||x W^T - y||^2 + lambda ||W - prior||^2 from the raw rows, float64 normal equations."""
    n, d = x.shape
    lam = damp * float(x.pow(2).mean())
    a = x.T @ x / n + lam * torch.eye(d, dtype=x.dtype)
    b = x.T @ y / n + (lam * prior.T if prior is not None else 0)
    return torch.linalg.solve(a, b).T


def test_heldout_choice_is_the_least_error_on_the_held_out_rows():
    """Few noisy fit rows (the re-fit overfits when weak): every candidate's held-out error and the winner, recomputed
    from raw rows; the ridge toward the current weights and toward zero."""
    from daprune.recovery import HELDOUT_DAMPS, heldout_choice

    g = torch.Generator().manual_seed(11)
    w_true = torch.randn(3, 6, generator=g, dtype=torch.float64)
    current = w_true + 0.3 * torch.randn(3, 6, generator=g, dtype=torch.float64)
    xf = torch.randn(9, 6, generator=g, dtype=torch.float64)
    yf = xf @ w_true.T + 0.5 * torch.randn(9, 3, generator=g, dtype=torch.float64)
    xh = torch.randn(64, 6, generator=g, dtype=torch.float64)
    yh = xh @ w_true.T
    fit, held = Moments(), Moments()
    fit.update(xf.float(), yf.float())
    held.update(xh.float(), yh.float())
    for toward in (True, False):
        w, errors = heldout_choice(fit, held, None, False, current.float(), toward)
        want = {"none": float((xh @ current.T - yh).pow(2).sum(1).mean())}
        for damp in HELDOUT_DAMPS:
            v = _raw_ridge(xf, yf, current if toward else None, damp)
            want[f"{damp:g}"] = float((xh @ v.T - yh).pow(2).sum(1).mean())
        assert errors.keys() == want.keys()
        for k in want:
            assert math.isclose(errors[k], want[k], rel_tol=1e-3, abs_tol=1e-5), (k, errors[k], want[k])
        best = min(want, key=want.get)
        assert best != "none"  # noisy but informative rows: some strength helps here
        v = _raw_ridge(xf, yf, current if toward else None, float(best))
        torch.testing.assert_close(w.double(), v, rtol=1e-3, atol=1e-4)


def test_heldout_choice_keeps_weights_no_refit_improves():
    """Current weights that are exactly right on the held-out rows: no re-fit can beat them, so none is made."""
    from daprune.recovery import heldout_choice

    g = torch.Generator().manual_seed(12)
    w_true = torch.randn(2, 5, generator=g)
    xf, xh = torch.randn(7, 5, generator=g), torch.randn(32, 5, generator=g)
    fit, held = Moments(), Moments()
    fit.update(xf, xf @ w_true.T + torch.randn(7, 2, generator=g))
    held.update(xh, xh @ w_true.T)
    w, errors = heldout_choice(fit, held, None, False, w_true)
    assert w is None and min(errors, key=errors.get) == "none"
