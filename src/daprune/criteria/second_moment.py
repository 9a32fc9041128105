"""The distribution-aware second-moment scores (method.md section 2) and their variants.

* ``second-moment`` (daprune default): ||D[:, j]||^2 * E[h_j^2], h = down_proj input. This is
  the exact expected energy channel j adds to the FFN output, i.e. the quantity the paper's score
  approximates under its Gaussian zero-mean input assumption, measured instead of modelled.
* ``paper``: the paper's SwiGLU product formula with the mean-centred covariance Sigma.
* ``paper-uncentred``: the same with the uncentred second moment E[x x^T] (the derivation assumes
  zero-mean input; RMSNorm outputs are far from zero-mean).
* ``authors``: the authors' early code, ||D_j|| * act(G_j^T Sigma G_j) * (U_j^T Sigma U_j).
Heads (all variants): E||z_h W_o,h^T||^2, the second moment of the head as a depth-2 module.
"""

from __future__ import annotations

import torch

from daprune.criteria.base import Criterion, o_head_second_moment, register
from daprune.fisher import weighted_rows
from daprune.models.adapter import BlockAdapter
from daprune.stats import BlockStats


def _quad(w: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Row-wise w_j^T Sigma w_j."""
    return torch.einsum("ji,ik,jk->j", w, sigma, w)


@register
class SecondMoment(Criterion):
    name = "second-moment"
    needs = frozenset({"down_in", "o_in"})

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        d = weighted_rows(block.ffn_out().weight.float(), stats.output_weight.get("down"))
        return d.pow(2).sum(0) * torch.diagonal(stats.down_in.second)

    def head_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return o_head_second_moment(block, stats)


@register
class PaperSecondMoment(SecondMoment):
    name = "paper"
    needs = frozenset({"ffn_in", "o_in"})
    needs_cov = frozenset({"ffn_in"})
    gated_only = True  # the score is the product of the gate's and the up projection's terms
    centred = True

    def sigma(self, stats: BlockStats) -> torch.Tensor:
        return stats.ffn_in.cov if self.centred else stats.ffn_in.second

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        gate, up = (lin.weight.float() for lin in block.ffn_in())
        d2 = block.ffn_out().weight.float().pow(2).sum(0)
        sigma = self.sigma(stats)
        return (0.5 * d2 * _quad(up, sigma)) * (0.5 * d2 * _quad(gate, sigma))


@register
class PaperUncentred(PaperSecondMoment):
    name = "paper-uncentred"
    centred = False
    needs_cov = frozenset()


@register
class AuthorsCode(PaperSecondMoment):
    name = "authors"

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        gate, up = (lin.weight.float() for lin in block.ffn_in())
        d = block.ffn_out().weight.float().norm(dim=0)
        sigma = self.sigma(stats)
        return d * block.ffn_act()(_quad(gate, sigma)) * _quad(up, sigma)
