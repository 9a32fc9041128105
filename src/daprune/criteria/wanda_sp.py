"""``wanda-sp``: structured Wanda (as in FLAP's code), scored on the level-2 linears' input columns.

Column j of o_proj / down_proj: mean_i |W_ij| * ||X_j||_2, with ||X_j||_2 over all calibration tokens,
i.e. sqrt(n * E[x_j^2]) from the streaming second moment. A head's score is the sum over its head_dim
columns of o_proj. Only the level-2 weights and their inputs are looked at: the score asks how much a
column contributes to the output, not how it is produced.
"""

from __future__ import annotations

import torch

from daprune.criteria.base import Criterion, register
from daprune.models.adapter import BlockAdapter
from daprune.stats import BlockStats, Moments


def wanda_columns(weight: torch.Tensor, mom: Moments) -> torch.Tensor:
    """mean_i |W_ij| * ||X_j||_2 for every input column j."""
    xnorm = (mom.n * torch.diagonal(mom.second)).clamp_min(0).sqrt()
    return weight.float().abs().mean(0) * xnorm


@register
class WandaSP(Criterion):
    name = "wanda-sp"
    needs = frozenset({"down_in", "o_in"})

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return wanda_columns(block.ffn_out().weight, stats.down_in)

    def head_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        cols = wanda_columns(block.attn_out().weight, stats.o_in)
        return cols.view(block.n_heads, block.head_dim).sum(1)
