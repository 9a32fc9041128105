"""--heldout-strength per-output: each output row of a re-fit takes the ridge strength (or no re-fit) that its own
held-out error prefers; checked against per-row ridge solves from raw rows, on rows no choice saw, and end to end."""

from __future__ import annotations

import pytest
import torch
from conftest import CharTokenizer, tiny_model
from test_families import tiny as tiny_llama_like

from daprune.api import prune
from daprune.config import PruneConfig
from daprune.errors import ConfigError
from daprune.fit_checks import check_criteria_fit
from daprune.models.adapter import get_adapter
from daprune.recovery import HELDOUT_DAMPS, heldout_choice
from daprune.stats import Moments


def _raw_ridge(x: torch.Tensor, y: torch.Tensor, prior: torch.Tensor, damp: float) -> torch.Tensor:
    """argmin_w mean(x w - y)^2 + lambda ||w - prior||^2 for one output row, float64 normal equations from rows."""
    n, d = x.shape
    lam = damp * float(x.pow(2).mean())
    return torch.linalg.solve(x.T @ x / n + lam * torch.eye(d, dtype=x.dtype), x.T @ y / n + lam * prior)


def _problem(seed: int = 5):
    """Rows 0-1: the current weights are off and the fit rows say how (a re-fit helps). Rows 2-3: the current weights
    are exact and the fit rows carry noise that would pull them away (no re-fit is best). One shared strength
    cannot serve both kinds."""
    g = torch.Generator().manual_seed(seed)
    d = 6
    w_true = torch.randn(4, d, generator=g, dtype=torch.float64)
    current = w_true.clone()
    current[:2] += 0.8 * torch.randn(2, d, generator=g, dtype=torch.float64)
    noise = torch.zeros(4, dtype=torch.float64)
    noise[2:] = 2.0

    def rows(n: int, noisy: bool) -> tuple[torch.Tensor, torch.Tensor]:
        x = torch.randn(n, d, generator=g, dtype=torch.float64)
        y = x @ w_true.T
        if noisy:
            y = y + noise * torch.randn(n, 4, generator=g, dtype=torch.float64)
        return x, y

    return current, rows(24, True), rows(64, False), rows(512, False)


def _moments(x: torch.Tensor, y: torch.Tensor) -> Moments:
    m = Moments()
    m.update(x.float(), y.float())
    return m


def test_each_row_takes_its_own_least_held_out_error_computed_from_raw_rows():
    current, (xf, yf), (xh, yh), _ = _problem()
    w, errors = heldout_choice(_moments(xf, yf), _moments(xh, yh), None, False, current.float(), True,
                               per_output=True)
    assert w is not None
    names = ["none", *(f"{d:g}" for d in HELDOUT_DAMPS)]
    want_rows, counts = [], dict.fromkeys(names, 0)
    for r in range(4):  # every row alone: its candidates from its own ridge solves, judged on its held-out rows
        cands = {"none": current[r]}
        cands.update({f"{d:g}": _raw_ridge(xf, yf[:, r], current[r], d) for d in HELDOUT_DAMPS})
        err = {k: float((xh @ v - yh[:, r]).pow(2).mean()) for k, v in cands.items()}
        best = min(names, key=lambda k: err[k])
        counts[best] += 1
        want_rows.append(cands[best])
    torch.testing.assert_close(w.double(), torch.stack(want_rows), rtol=1e-3, atol=1e-4)
    assert errors["rows"] == counts
    assert counts["none"] == 2 and torch.equal(w[2:], current[2:].float())  # the exact rows stay as they are
    assert errors["per-output"] < min(v for k, v in errors.items() if k not in ("rows", "per-output"))


def test_per_output_is_closer_than_the_shared_choice_on_rows_neither_saw():
    current, (xf, yf), (xh, yh), (xt, yt) = _problem()
    fit, held = _moments(xf, yf), _moments(xh, yh)
    shared, _ = heldout_choice(fit, held, None, False, current.float(), True)
    rows, _ = heldout_choice(fit, held, None, False, current.float(), True, per_output=True)

    def fresh(w: torch.Tensor | None) -> float:
        w = current if w is None else w.double()
        return float((xt @ w.T - yt).pow(2).sum(1).mean())

    assert fresh(rows) < 0.9 * fresh(shared)
    assert fresh(rows) < fresh(None)


def test_no_row_improved_means_no_refit():
    current, (xf, yf), (xh, yh), _ = _problem()
    held = _moments(xh, yh)  # held-out rows on which current rows 2-3 are exact; make 0-1 exact too
    exact = current.clone()
    exact[:2] = torch.linalg.lstsq(xh, yh[:, :2]).solution.T
    w, errors = heldout_choice(_moments(xf, yf), held, None, False, exact.float(), True, per_output=True)
    assert w is None and errors["rows"]["none"] == 4


def test_refused_where_it_would_choose_nothing_or_rows_are_coupled():
    with pytest.raises(ConfigError, match="chooses none"):
        PruneConfig(recovery="post", heldout_strength="per-output").validate()
    with pytest.raises(ConfigError, match="must be one of"):
        PruneConfig(recovery="heldout", heldout_nsamples=4, heldout_strength="rows").validate()
    cfg = PruneConfig(recovery="heldout", heldout_nsamples=4, heldout_strength="per-output", recovery_target="block",
                      layers="1:-1")
    cfg.validate()
    check_criteria_fit(get_adapter(tiny_model()), cfg)
    with pytest.raises(ConfigError, match="couples the rows"):  # Gemma's post-FFN norm
        check_criteria_fit(get_adapter(tiny_llama_like("gemma3_text")), cfg)
    linear = PruneConfig(recovery="heldout", heldout_nsamples=4, heldout_strength="per-output", layers="1:-1")
    check_criteria_fit(get_adapter(tiny_llama_like("gemma3_text")), linear)
    with pytest.raises(ValueError, match="couples"):
        heldout_choice(Moments(), Moments(), None, False, torch.zeros(1, 1), judge=lambda w: 0.0, per_output=True)


def test_end_to_end_the_setting_changes_the_model_and_is_reported(one_thread):
    kw = dict(tokenizer=CharTokenizer(), calibration="random", nsamples=16, seqlen=32, layers="1:-1", batch_size=4,
              progress=False, sparsity=0.3, recovery="heldout", heldout_nsamples=8, recovery_target="block",
              recovery_inputs=True)
    shared = prune(model=tiny_model(), **kw)
    rows = prune(model=tiny_model(), heldout_strength="per-output", **kw)
    assert rows.report["settings"]["heldout_strength"] == "per-output"
    assert shared.report["kept_channels"] == rows.report["kept_channels"]
    infos = [v for layer in rows.report["layers"] for v in (layer["damping"] or {}).values()
             if isinstance(v, dict) and "heldout_errors" in v]
    assert infos and all("rows" in v["heldout_errors"] for v in infos)
    # some linear mixes strengths across its rows, and the model differs from the shared choice's
    assert any(sum(n > 0 for n in v["heldout_errors"]["rows"].values()) > 1 for v in infos)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert not torch.allclose(rows.model(ids).logits, shared.model(ids).logits)
