"""Least-squares re-fit of a Linear to dense targets ("remedy", method.md section 4).

Pure functions of accumulated statistics, so they are testable on a 4x3 example and never touch a
model: ``W = (G + lambda I)^-1 C`` with G = E[x x^T] of the *pruned-stream* input and
C = E[x y^T] against the *dense* output.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from daprune.errors import NumericalError
from daprune.stats import Moments

log = logging.getLogger(__name__)


@dataclass
class SolveInfo:
    damp: float  # the lambda finally used
    escalations: int  # how many times lambda was multiplied by 10 after a Cholesky failure


def ridge_solve(
    gram: torch.Tensor,
    cross: torch.Tensor,
    *,
    damp: float = 1e-4,
    prior: torch.Tensor | None = None,
    max_escalations: int = 8,
) -> tuple[torch.Tensor, SolveInfo]:
    """Solve ``min_W E||x W^T - y||^2 + lambda ||W - prior||^2`` for W of shape [out, in].

    lambda = damp * mean(diag(gram)); on Cholesky failure it is multiplied by 10 (reported in
    SolveInfo) because a rank-deficient Gram (few tokens, dead channels) is common and a slightly
    stronger ridge is the least surprising fix. ``prior=None`` shrinks toward zero as the paper does;
    passing the original weight shrinks toward it instead.
    """
    gram = gram.double()
    cross = cross.double()
    scale = torch.diagonal(gram).mean().clamp_min(1e-12)
    lam = damp * scale
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    for k in range(max_escalations + 1):
        chol, info = torch.linalg.cholesky_ex(gram + lam * eye)
        if int(info) == 0:
            w_t = torch.cholesky_solve(cross if prior is None else cross + lam * prior.double().T, chol)
            return w_t.T.float().contiguous(), SolveInfo(float(lam / scale), k)
        log.warning("Gram matrix not positive definite; raising damping to %.1e", float(lam * 10 / scale))
        lam = lam * 10
    raise NumericalError(
        f"Gram matrix stays singular after raising damping to {float(lam / scale):.1e} (non-finite or degenerate "
        "calibration activations?)"
    )


def row_objectives(gram: torch.Tensor, cross: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Each output row's E(x w_r - y_r)^2 less its constant E[y_r^2]: w_r G w_r - 2 w_r c_r (the diagonals of
    ``objective``'s traces). The rows' least squares share the Gram and nothing else, so each row's error depends on
    its own weights only."""
    w = w.double()
    return ((w @ gram.double()) * w).sum(1) - 2 * (w * cross.double().T).sum(1)


def objective(gram: torch.Tensor, cross: torch.Tensor, y_second: torch.Tensor, w: torch.Tensor) -> float:
    """E||x W^T - y||^2 from statistics: tr(W G W^T) - 2 tr(W C) + E||y||^2, the rows' errors summed."""
    return float(row_objectives(gram, cross, w).sum() + y_second)


# ridge strengths (relative to the mean Gram diagonal) ``--recovery heldout`` tries, strongest last; with the
# prior at the original weights a strong ridge is nearly "no re-fit", which is also a candidate of its own
HELDOUT_DAMPS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


def least_squares_terms(mom: Moments, cols: torch.Tensor | None, bias: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(E[x x^T], E[x y^T]) of ``mom`` over the input columns ``cols``, with a constant-1 input appended when the
    linear has a bias (so the bias is fitted as one more column)."""
    gram, cross, mean = mom.second, mom.cross_mean, mom.mean
    if cols is not None:
        gram, cross, mean = gram[cols][:, cols], cross[cols], mean[cols]
    if bias:
        g = torch.zeros(gram.shape[0] + 1, gram.shape[0] + 1, dtype=gram.dtype, device=gram.device)
        g[:-1, :-1], g[:-1, -1], g[-1, :-1], g[-1, -1] = gram, mean, mean, 1.0
        gram = g
        cross = torch.cat([cross, (mom.ysum / mom.n)[None]], 0)
    return gram, cross


def heldout_choice(fit: Moments, heldout: Moments, cols: torch.Tensor | None, bias: bool, current: torch.Tensor,
                   toward_current: bool = True, judge: Callable[[torch.Tensor], float] | None = None,
                   per_output: bool = False) -> tuple[torch.Tensor | None, dict]:
    """The ridge re-fit whose error on the held-out rows is least, or None when no strength beats leaving
    ``current`` as it is (``--recovery heldout``: a re-fit that only helps its own rows is skipped).

    ``current``: the weights now, over ``cols`` (bias as the last column when ``bias``); the ridge pulls toward it
    (``toward_current``) or toward zero. Returns the chosen weight and, for the report, every candidate's held-out
    error: E||x W^T - y||^2 from the held-out statistics, or ``judge(W)`` where the fitted target is only a
    linearisation of what matters (the block output through Gemma's post-FFN norm), so that the choice is made on
    the real error.

    ``per_output`` (``--heldout-strength per-output``): every output row takes the candidate (a strength, or its
    current weights) with the least held-out error of its own, since the rows' problems are separate; the errors
    then also hold the combination's ("per-output") and ``rows``, how many rows took each candidate. Only from
    held-out moments: a ``judge`` sees the block output through a norm that couples the rows.
    """
    if per_output and judge is not None:
        raise ValueError("a per-output choice needs separable held-out errors; a judge couples the output rows")
    gram, cross = least_squares_terms(fit, cols, bias)
    hgram = hcross = None
    if judge is None:
        hgram, hcross = least_squares_terms(heldout, cols, bias)
        hy = heldout.ysq / heldout.n

        def judge(w: torch.Tensor) -> float:
            return objective(hgram, hcross, hy, w)

    errors: dict = {"none": judge(current)}
    best, best_err = None, errors["none"]
    candidates = {"none": current.float()}
    for damp in HELDOUT_DAMPS:
        w, _ = ridge_solve(gram, cross, damp=damp, prior=current if toward_current else None)
        errors[f"{damp:g}"] = err = judge(w)
        candidates[f"{damp:g}"] = w
        if err < best_err:
            best, best_err = w, err
    if not per_output:
        return best, errors
    names = list(candidates)
    per_row = torch.stack([row_objectives(hgram, hcross, candidates[k].to(hgram.device)) for k in names])
    pick = per_row.argmin(0)  # ties go to the first candidate: "none", the weights as they are
    stacked = torch.stack([candidates[k].to(current.device) for k in names])
    w = stacked[pick.to(current.device), torch.arange(current.shape[0], device=current.device)]
    errors["per-output"] = judge(w)
    errors["rows"] = {k: int((pick == i).sum()) for i, k in enumerate(names)}
    return (None if errors["rows"]["none"] == current.shape[0] else w), errors


# Levenberg-Marquardt damping of the step through a post-FFN norm, relative to the row's median gain: a channel whose
# gain is a tenth of the median moves the block output so little that the undamped step there is ten times the drift
BLOCK_STEP_DAMP = 0.1


def block_target_step(o: torch.Tensor, shortfall: torch.Tensor, gain: torch.Tensor | float) -> torch.Tensor:
    """How far the level-2 FFN linear's output ``o`` should move for the block output to gain ``shortfall``
    (``--recovery-target block``): ``shortfall / gain`` where the FFN output is added as it is (exact).

    Through a norm (Gemma-2/3, ``gain`` a tensor) that quotient is a Gauss-Newton step and breaks where the norm's
    gain is near zero: Gemma-3-270M has channels with gains under 1% of the median, and dividing by them asked
    down_proj for outputs so large that the norm shrank every other channel (measured: WikiText-2 93 -> 243). So
    the step is damped per channel, gain * shortfall / (gain^2 + lambda) with lambda = (BLOCK_STEP_DAMP * the row's
    median |gain|)^2, and its part along ``o``, which the norm cannot see but which changes its scale, is removed.
    """
    if not isinstance(gain, torch.Tensor):
        return shortfall / gain
    lam = (BLOCK_STEP_DAMP * gain.abs().median(-1, keepdim=True).values) ** 2
    step = gain * shortfall / (gain * gain + lam)
    along = (step * o).sum(-1, keepdim=True) / o.pow(2).sum(-1, keepdim=True).clamp_min(1e-30)
    return step - along * o
