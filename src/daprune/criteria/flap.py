"""``flap``: FLAP's fluctuation metric and bias compensation (An et al., AAAI 2024).

Score of input column j of o_proj / down_proj: Var(X_j) * ||W[:, j]||^2 (FLAP's "WIFV"): how much the
output moves when column j's input fluctuates around its mean. A column whose input is nearly constant
can be removed and replaced by a constant, which is what the compensation does: after pruning, the
removed columns' mean contribution W[:, removed] @ E[X_removed] is added as a bias of o_proj / down_proj.
A head's score is the sum over its head_dim columns.

For FLAP's adaptive structure search (daprune.adaptive) the attention metric is squared per column
before the per-layer standardisation, as FLAP's code does (``head_column_scores``).

Llama has no such biases; the block gets one via ``BlockAdapter.add_output_bias`` and, after pruning,
``ModelAdapter.sync_biases`` sets ``mlp_bias`` / ``attention_bias`` with zero biases on the other
linears of every block, so vanilla transformers loads the result. Families without such a flag
(Mistral, Qwen2, and Qwen3's MLP) get zero biases on that level-2 linear in every block and its name in
``config.daprune_extra_biases``; such a folder always ships the remote code (even with uniform shapes)
and loads through ``trust_remote_code=True`` or ``daprune.load``, not through vanilla transformers.
Option ``compensate=False`` turns the compensation off (FLAP's ablation).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from daprune.criteria.base import Criterion, head_columns, register
from daprune.models.adapter import BlockAdapter
from daprune.stats import BlockStats, Moments


def fluctuation(weight: torch.Tensor, mom: Moments) -> torch.Tensor:
    """Var(X_j) * ||W[:, j]||^2 for every input column j (variance over calibration tokens)."""
    var = mom.var.clamp_min(0)  # accumulated centred: no E[x^2] - m^2 cancellation on high-mean channels
    return var * weight.float().pow(2).sum(0)


@register
class Flap(Criterion):
    name = "flap"
    needs = frozenset({"down_in", "o_in"})

    @property
    def compensate(self) -> bool:
        return bool(self.options.get("compensate", True))

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return fluctuation(block.ffn_out().weight, stats.down_in)

    def head_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        return fluctuation(block.attn_out().weight, stats.o_in).view(block.n_heads, block.head_dim).sum(1)

    def head_column_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        """Per o_proj column, squared: the quantity FLAP standardises per layer before averaging per head."""
        return fluctuation(block.attn_out().weight, stats.o_in).pow(2)

    def after_ffn_prune(self, block: BlockAdapter, removed: Sequence[int], stats: BlockStats) -> None:
        if not self.compensate or len(removed) == 0:
            return
        idx = torch.as_tensor(list(removed), dtype=torch.long)
        w = block.ffn_out().weight.float()[:, idx]
        block.add_output_bias("mlp", w @ stats.down_in.mean[idx])

    def after_head_prune(self, block: BlockAdapter, removed: Sequence[int], stats: BlockStats) -> None:
        if not self.compensate or len(removed) == 0:
            return
        cols = head_columns(removed, block.head_dim)
        w = block.attn_out().weight.float()[:, cols]
        block.add_output_bias("attention", w @ stats.o_in.mean[cols])
