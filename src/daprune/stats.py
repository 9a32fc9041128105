"""Streaming accumulators for second moments, Gram and cross matrices (fp32 sums; centred statistics
merged in fp64).

Calibration activations arrive batch by batch; nothing here keeps more than the running sums, so
memory is independent of the number of calibration tokens.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from daprune.errors import NumericalError

if TYPE_CHECKING:
    from daprune.fisher import OutputWeight


class Moments:
    """Running E[x], E[x x^T] and, optionally, E[x y^T] for paired targets y.

    The centred statistics (``var``, ``cov``) are *not* derived from the raw fp32 Gram: E[x x^T] - m m^T
    cancels catastrophically on high-mean channels (mean 1e4, std 1: fp32 keeps E[x^2] = 1e8 to about
    +-8, so the variance comes out as noise). They are accumulated centred instead, merging each batch's
    fp64 mean and centred sums by Chan et al.'s pairwise rule. The per-channel variance costs O(tokens x
    width) and is always kept; the full covariance costs a second Gram matmul, so the pipeline asks for it
    (``full_cov``) only where a criterion reads it. The raw sums are untouched, so ``second`` is unchanged.
    """

    def __init__(self, name: str = "", full_cov: bool = True):
        self.name = name
        self.n = 0
        self.sum: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None
        self.cross: torch.Tensor | None = None
        self.ysum: torch.Tensor | None = None
        self.ysq = 0.0
        self.full_cov = full_cov
        self._mean64: torch.Tensor | None = None  # fp64 running mean (Chan merge)
        self._m2_diag: torch.Tensor | None = None  # fp64 sum of squared deviations, per channel
        self._m2: torch.Tensor | None = None  # fp64 centred Gram sum (x - mean)(x - mean)^T, when full_cov

    def update(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        x = x.reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise NumericalError(f"non-finite activations at {self.name or 'a module input'}")
        if self.gram is None:
            self.sum = torch.zeros(x.shape[1], dtype=torch.float32, device=x.device)
            self.gram = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float32, device=x.device)
        xsum = x.sum(0)
        self.sum += xsum
        self.gram += x.T @ x
        if y is not None:
            y = y.reshape(-1, y.shape[-1]).float()
            if self.cross is None:
                self.cross = torch.zeros(x.shape[1], y.shape[1], dtype=torch.float32, device=x.device)
                self.ysum = torch.zeros(y.shape[1], dtype=torch.float32, device=x.device)
            self.cross += x.T @ y
            self.ysum += y.sum(0)
            self.ysq += float(y.pow(2).sum())
        self._merge_centred(x, xsum)
        self.n += x.shape[0]

    def add_zeros(self, count: int) -> None:
        """Count ``count`` all-zero rows without materialising them.

        A routed expert contributes nothing to the tokens the router sends elsewhere; its moments over *all*
        tokens (the units of the block output error) are its routed rows plus that many zero rows.
        """
        if count <= 0:
            return
        if self.gram is None:
            raise NumericalError(f"{self.name or 'these moments'}: zero rows need at least one real row first")
        width = self.gram.shape[0]
        zeros = torch.zeros(width, dtype=torch.float64, device=self.gram.device)
        self._merge_stats(count, zeros, zeros.clone(), torch.zeros(width, width, dtype=torch.float64,
                                                                   device=self.gram.device) if self.full_cov else None)
        self.n += count

    def _merge_centred(self, x: torch.Tensor, xsum: torch.Tensor) -> None:
        """Chan's merge of this batch's mean and centred sums into the running ones (before ``n`` grows).

        Within a batch fp32 is enough once centred on the batch's own mean (its rounding error only adds
        n * err^2 to the squared deviations); the merge across batches, where the means meet, runs in fp64.
        """
        nb = x.shape[0]
        if nb == 0:
            return
        xc = x - xsum / nb
        m2b_diag = xc.pow(2).sum(0).double()
        m2b = (xc.T @ xc).double() if self.full_cov else None
        self._merge_stats(nb, (xsum / nb).double(), m2b_diag, m2b)

    def _merge_stats(self, nb: int, mb: torch.Tensor, m2b_diag: torch.Tensor, m2b: torch.Tensor | None) -> None:
        """Chan's pairwise merge of a batch's (count, fp64 mean, centred sums) into the running ones."""
        na = self.n
        if self._mean64 is None:
            self._mean64, self._m2_diag, self._m2 = mb, m2b_diag, m2b
            return
        delta = mb - self._mean64
        w = na * nb / (na + nb)
        self._mean64 = self._mean64 + delta * (nb / (na + nb))
        self._m2_diag = self._m2_diag + m2b_diag + delta.pow(2) * w
        if self.full_cov:
            self._m2 = self._m2 + m2b + torch.outer(delta, delta) * w

    @property
    def mean(self) -> torch.Tensor:
        return self.sum / self.n

    @property
    def second(self) -> torch.Tensor:
        """Uncentred second moment E[x x^T]."""
        return self.gram / self.n

    @property
    def var(self) -> torch.Tensor:
        """Per-channel (population) variance, accumulated centred in fp64; fp32 like the other statistics."""
        return (self._m2_diag / self.n).float()

    @property
    def cov(self) -> torch.Tensor:
        """Mean-centred (population) covariance, what the paper's text calls Sigma; accumulated centred.

        Needs ``full_cov=True``: computing it from the raw Gram is exactly the cancellation avoided here.
        """
        if self._m2 is None:
            raise NumericalError(f"{self.name or 'these moments'}: the full covariance was not accumulated "
                                 "(Moments(full_cov=False)); read .var for the per-channel variance")
        return (self._m2 / self.n).float()

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
    # --error-weight fisher / kfac: the loss's weight of the output dimensions of o_proj ("o") and down_proj ("down")
    output_weight: dict[str, OutputWeight] = field(default_factory=dict)
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
