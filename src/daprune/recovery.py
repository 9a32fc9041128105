"""Least-squares re-fit of a Linear to dense targets ("remedy", method.md section 4).

Pure functions of accumulated statistics, so they are testable on a 4x3 example and never touch a
model: ``W = (G + lambda I)^-1 C`` with G = E[x x^T] of the *pruned-stream* input and
C = E[x y^T] against the *dense* output.
"""

from __future__ import annotations

import logging
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


def objective(gram: torch.Tensor, cross: torch.Tensor, y_second: torch.Tensor, w: torch.Tensor) -> float:
    """E||x W^T - y||^2 from statistics: tr(W G W^T) - 2 tr(W C) + E||y||^2."""
    w = w.double()
    return float(torch.trace(w @ gram.double() @ w.T) - 2 * torch.trace(w @ cross.double()) + y_second)


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
                   toward_current: bool = True) -> tuple[torch.Tensor | None, dict]:
    """The ridge re-fit whose error on the held-out rows is least, or None when no strength beats leaving
    ``current`` as it is (``--recovery heldout``: a re-fit that only helps its own rows is skipped).

    ``current``: the weights now, over ``cols`` (bias as the last column when ``bias``); the ridge pulls toward it
    (``toward_current``) or toward zero. Returns the chosen weight and, for the report, every candidate's held-out
    error E||x W^T - y||^2.
    """
    gram, cross = least_squares_terms(fit, cols, bias)
    hgram, hcross = least_squares_terms(heldout, cols, bias)
    hy = heldout.ysq / heldout.n
    errors = {"none": objective(hgram, hcross, hy, current)}
    best, best_err = None, errors["none"]
    for damp in HELDOUT_DAMPS:
        w, _ = ridge_solve(gram, cross, damp=damp, prior=current if toward_current else None)
        errors[f"{damp:g}"] = err = objective(hgram, hcross, hy, w)
        if err < best_err:
            best, best_err = w, err
    return best, errors
