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
