"""Data-free weight-magnitude baselines: ``l1``, ``l2`` (all weights of a unit), ``depth1``, ``depth2``.

A unit's weights: for an FFN channel j the gate row, the up row and the down column; for a query
head its q rows and its o columns (with GQA the k/v rows are shared by the group, so they belong to no
single query head; without GQA, group size 1, the head owns its k/v rows and they are included).

``depth1`` / ``depth2`` are the paper's data-free ablations of its own score (method.md section 2):
||A_j|| with A the level-1 weight (gate and up rows together for SwiGLU), and ||A_j|| * ||B[:, j]||,
i.e. the second-moment score with Sigma = I and the level-2 norm un-squared. They score FFN channels
only (they are not head criteria in config.HEAD_CRITERIA).
"""

from __future__ import annotations

import torch

from daprune.criteria.base import Criterion, register
from daprune.models.adapter import BlockAdapter
from daprune.stats import BlockStats


def ffn_unit_sums(block: BlockAdapter, fn) -> torch.Tensor:
    """Sum of ``fn(w)`` over each channel's weights: gate row + up row + down column."""
    total = sum(fn(lin.weight.float()).sum(1) for lin in block.ffn_in())
    return total + fn(block.ffn_out().weight.float()).sum(0)


def head_unit_sums(block: BlockAdapter, fn) -> torch.Tensor:
    """Sum of ``fn(w)`` over each query head's weights: its q rows and o columns (+ k/v rows if it owns them)."""
    hd, h = block.head_dim, block.n_heads
    q, k, v = block.attn_in()
    total = fn(q.weight.float()).sum(1).view(h, hd).sum(1)
    total = total + fn(block.attn_out().weight.float()).sum(0).view(h, hd).sum(1)
    if block.group_size == 1:
        for lin in (k, v):
            total = total + fn(lin.weight.float()).sum(1).view(h, hd).sum(1)
    return total


@register
class L1(Criterion):
    name = "l1"
    data_free = True

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return ffn_unit_sums(block, torch.abs)

    def head_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return head_unit_sums(block, torch.abs)


@register
class L2(Criterion):
    name = "l2"
    data_free = True

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return ffn_unit_sums(block, torch.square).sqrt()

    def head_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return head_unit_sums(block, torch.square).sqrt()


def level1_norm(block: BlockAdapter) -> torch.Tensor:
    """||A_j||: the norm of channel j's level-1 weights, gate and up rows taken together."""
    return sum(lin.weight.float().pow(2).sum(1) for lin in block.ffn_in()).sqrt()


@register
class Depth1(Criterion):
    name = "depth1"
    data_free = True

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return level1_norm(block)


@register
class Depth2(Criterion):
    name = "depth2"
    data_free = True

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return level1_norm(block) * block.ffn_out().weight.float().norm(dim=0)
