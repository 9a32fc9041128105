"""Streaming fp32 accumulators for second moments, Gram and cross matrices.

Calibration activations arrive batch by batch; nothing here keeps more than the running sums, so
memory is independent of the number of calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from daprune.errors import NumericalError


class Moments:
    """Running E[x], E[x x^T] and, optionally, E[x y^T] for paired targets y."""

    def __init__(self, name: str = ""):
        self.name = name
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.ysum: torch.Tensor | None = None
        self.ysq = 0.0

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise NumericalError(f"non-finite activations at {self.name or 'a module input'}")
        if self.gram is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        self.sum += x.sum(0)
        self.gram += x.T @ x
        if y is not None:
            y = y.reshape(-1, y.shape[-1]).float()
            if self.cross is None:
                self.cross = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float32, device=x.device)
                self.ysum = torch.zeros(y.shape[1], dtype=torch.float32, device=x.device)
            self.cross += x.T @ y
            self.ysum += y.sum(0)
            self.ysq += float(y.pow(2).sum())
        self.n += x.shape[0]

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def second(self) -> torch.Tensor:
        """Uncentred second moment E[x x^T]."""
        return self.gram / self.n

    @property
    def cov(self) -> torch.Tensor:
        """Mean-centred covariance (what the paper's text calls Sigma)."""
        m = self.mean
        return self.second - torch.outer(m, m)

    @property
    def cross_mean(self) -> torch.Tensor:
        return self.cross / self.n


@dataclass
class BlockStats:
    """What criteria may read about one block: inputs of the level-1 and level-2 linears.

    ``attn_in``: post-norm input of q/k/v; ``o_in``: input of o_proj (concatenated head outputs);
    ``ffn_in``: post-norm input of gate/up; ``down_in``: input of down_proj (act(gate)*up).
    """

    attn_in: Moments | None = None
    o_in: Moments | None = None
    ffn_in: Moments | None = None
    down_in: Moments | None = None
    attn_probs: torch.Tensor | None = None  # [N, heads, s, s] (fp32), only when a criterion needs it
    grads: dict[str, torch.Tensor] = field(default_factory=dict)  # weight-shaped, for Taylor criteria
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
