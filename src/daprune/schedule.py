"""Parameter accounting and the per-block budget (method.md section 6).

All counting of "how many parameters does removing X free" lives here, so the CLI's
``--sparsity`` (fraction of the *whole* model) maps to exact per-block head/channel counts.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from daprune.errors import ConfigError
from daprune.models.adapter import BlockAdapter


def channel_params(block: BlockAdapter) -> int:
    """Parameters freed by removing one FFN channel: a row of each level-1 linear and a down column."""
    n = sum(lin.in_features + (1 if lin.bias is not None else 0) for lin in block.ffn_in())
    return n + block.ffn_out().out_features


def head_unit_params(block: BlockAdapter) -> int:
    """Parameters freed by removing one query head from *every* KV group (the GQA-preserving unit)."""
    q = block.attn_in()[0]
    per_head = block.head_dim * (q.in_features + (1 if q.bias is not None else 0))
    per_head += block.head_dim * block.attn_out().out_features
    return per_head * block.n_kv_heads


@dataclass(frozen=True)
class BlockPlan:
    """How much one block loses: query heads per KV group and FFN channels."""

    heads_per_group: int
    channels: int
    params: int  # parameters this plan removes


def channels_for(block: BlockAdapter, params: float, multiple: int) -> int | None:
    """Fewest channels to prune so that >= ``params`` are freed and kept channels are a multiple."""
    n = block.n_channels
    c = max(0, math.ceil(params / channel_params(block)))
    keep = n - c
    keep -= keep % multiple
    c = n - keep
    return c if keep >= max(multiple, 1) else None


def candidate_plans(block: BlockAdapter, target: float, multiple: int = 1,
                    max_heads_per_group: int | None = None) -> list[BlockPlan]:
    """Every way to remove >= ``target`` params: k query heads per group + channels for the rest."""
    if target <= 0:
        return [BlockPlan(0, 0, 0)]
    plans = []
    limit = block.group_size - 1 if max_heads_per_group is None else min(max_heads_per_group, block.group_size - 1)
    hu = head_unit_params(block)
    for k in range(limit + 1):
        c = channels_for(block, max(0.0, target - k * hu), multiple)
        if c is None:
            continue
        plans.append(BlockPlan(k, c, k * hu + c * channel_params(block)))
    return plans


def paper_plan(block: BlockAdapter, target: float, multiple: int = 1) -> BlockPlan | None:
    """The paper's uniform rule: the same fraction of heads and channels (heads rounded to GQA units)."""
    block_params = head_unit_params(block) * block.group_size + channel_params(block) * block.n_channels
    ratio = target / block_params
    k = min(round(ratio * block.group_size), block.group_size - 1)
    plans = [p for p in candidate_plans(block, target, multiple) if p.heads_per_group == k]
    return plans[0] if plans else None


def block_target(total_params: int, sparsity: float, n_blocks: int) -> float:
    return sparsity * total_params / n_blocks


def max_removable(block: BlockAdapter, multiple: int = 1) -> int:
    """Most a block can lose: all but one query head per group and all but ``multiple`` channels."""
    return (block.group_size - 1) * head_unit_params(block) + (block.n_channels - multiple) * channel_params(block)


def check_budget(blocks: list[BlockAdapter], total_params: int, sparsity: float, multiple: int) -> float:
    """Per-block target, or a clear error when the block range cannot hold the budget."""
    if not blocks:
        raise ConfigError("the block range is empty")
    target = block_target(total_params, sparsity, len(blocks))
    worst = min(max_removable(b, multiple) for b in blocks)
    if target > worst:
        reach = worst * len(blocks) / total_params
        raise ConfigError(
            f"--sparsity {sparsity} cannot be met inside {len(blocks)} blocks: at most {reach:.3f} of the "
            "model's parameters can be removed there; widen --layers or lower --sparsity"
        )
    return target
