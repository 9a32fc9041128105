"""``random``: uniformly random scores, the data-free floor every other criterion must beat.

Seeded by the run's seed and the block index, so a run is reproducible and blocks draw independent
rankings; FFN channels and heads use separate streams so slicing heads never shifts the channel draw.
"""

from __future__ import annotations

import torch

from daprune.criteria.base import Criterion, register
from daprune.models.adapter import BlockAdapter
from daprune.stats import BlockStats

_STRIDE = 1_000_003  # > any block count: (seed, block) pairs never collide


@register
class RandomCriterion(Criterion):
    name = "random"
    needs = frozenset()
    data_free = True

    def _draw(self, block: BlockAdapter, n: int, stream: int) -> torch.Tensor:
        g = torch.Generator().manual_seed((self.seed * _STRIDE + block.index) * 2 + stream)
        return torch.rand(n, generator=g)

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return self._draw(block, block.n_channels, 0)

    def head_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return self._draw(block, block.n_heads, 1)
