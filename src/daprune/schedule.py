"""Parameter accounting and the per-block budget (method.md section 6).

All counting of "how many parameters does removing X free" lives here, so the CLI's
``--sparsity`` (a fraction of the whole model, or of its decoder blocks) maps to exact per-block
head/channel counts.

Heads come in two units that keep a block loadable by every runtime: one query head from *every* KV
group (GQA: the groups stay equal, no KV head is lost), and one whole KV group with its query heads
(multi-head attention, where every head is its own group; GQA models only with ``--kv-groups``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from daprune.errors import ConfigError
from daprune.models.adapter import BlockAdapter


def channel_params(block: BlockAdapter) -> float:
    """Parameters freed by removing one FFN channel: a row of each level-1 linear and a down column.

    A mixture-of-experts block states its own unit (one channel of every routed expert, plus the shared
    expert's proportional share).
    """
    own = getattr(block, "channel_params", None)
    if own is not None:
        return own()
    n = sum(lin.in_features + (1 if lin.bias is not None else 0) for lin in block.ffn_in())
    return n + block.ffn_out().out_features


def query_head_params(block: BlockAdapter) -> int:
    """Parameters of one query head: its q rows (with bias) and its o columns."""
    q = block.attn_in()[0]
    return block.head_dim * (q.in_features + (1 if q.bias is not None else 0) + block.attn_out().out_features)


def kv_head_params(block: BlockAdapter) -> int:
    """Parameters of one KV head: its k and v rows (with biases)."""
    return sum(block.head_dim * (lin.in_features + (1 if lin.bias is not None else 0)) for lin in block.attn_in()[1:])


def head_unit_params(block: BlockAdapter) -> int:
    """Parameters freed by removing one query head from *every* KV group (the GQA-preserving unit)."""
    return query_head_params(block) * block.n_kv_heads


def group_params(block: BlockAdapter) -> int:
    """Parameters freed by removing one whole KV group: its KV head and all its query heads."""
    return kv_head_params(block) + block.group_size * query_head_params(block)


@dataclass(frozen=True)
class BlockPlan:
    """How much one block loses: query heads per kept KV group, whole KV groups, FFN channels."""

    heads_per_group: int
    channels: int
    params: int  # parameters this plan removes
    kv_groups: int = 0


def plan_params(block: BlockAdapter, heads_per_group: int, kv_groups: int, channels: int) -> int:
    left = block.n_kv_heads - kv_groups
    return round(kv_groups * group_params(block) + heads_per_group * left * query_head_params(block)
                 + channels * channel_params(block))


def width_multiple(block: BlockAdapter, multiple: int) -> int:
    """The multiple kept FFN widths are rounded to: ``--channel-multiple`` and the block's own alignment.

    Mixture-of-experts blocks need kept expert widths whose rows are 16-byte aligned (transformers' default
    grouped-matmul expert kernel refuses others: "strides should be multiple of 16 bytes"), so their
    widths are also multiples of ``block.width_alignment`` (8: 16 bytes in bf16/fp16).
    """
    return math.lcm(max(multiple, 1), getattr(block, "width_alignment", 1))


def channels_for(block: BlockAdapter, params: float, multiple: int) -> int | None:
    """Fewest channels to prune so that >= ``params`` are freed and kept channels are a multiple."""
    multiple = width_multiple(block, multiple)
    n = block.n_channels
    c = max(0, math.ceil(params / channel_params(block)))
    keep = n - c
    keep -= keep % multiple
    c = n - keep
    return c if keep >= max(multiple, 1) else None


def head_options(block: BlockAdapter, kv_groups: bool, heads: bool = True) -> list[tuple[int, int]]:
    """Every (whole KV groups, query heads per kept group) a block may lose, the first option (0, 0).

    Multi-head attention (group size 1) loses heads only as whole groups, so they are always allowed;
    GQA models lose whole groups only when asked (``kv_groups``). At least one query head stays.
    """
    if not heads:
        return [(0, 0)]
    g, n_kv = block.group_size, block.n_kv_heads
    groups = range(n_kv) if (kv_groups or g == 1) else range(1)
    return [(r, k) for r in groups for k in range(g)]


def candidate_plans(block: BlockAdapter, target: float, multiple: int = 1, max_heads_per_group: int | None = None,
                    kv_groups: bool = False) -> list[BlockPlan]:
    """Every way to remove >= ``target`` params: heads (per group and whole groups) + channels for the rest."""
    if target <= 0:
        return [BlockPlan(0, 0, 0)]
    plans = []
    for r, k in head_options(block, kv_groups, heads=max_heads_per_group != 0):
        c = channels_for(block, max(0.0, target - plan_params(block, k, r, 0)), multiple)
        if c is None:
            continue
        plans.append(BlockPlan(k, c, plan_params(block, k, r, c), r))
    return plans


def heads_removed(block: BlockAdapter, plan: BlockPlan) -> int:
    return plan.kv_groups * block.group_size + plan.heads_per_group * (block.n_kv_heads - plan.kv_groups)


def paper_plan(block: BlockAdapter, target: float, multiple: int = 1, kv_groups: bool = False) -> BlockPlan | None:
    """The paper's uniform rule: the same fraction of heads and channels (heads rounded to valid units)."""
    block_params = group_params(block) * block.n_kv_heads + channel_params(block) * block.n_channels
    want = target / block_params * block.n_heads
    plans = candidate_plans(block, target, multiple, kv_groups=kv_groups)
    if not plans:
        return None
    return min(plans, key=lambda p: (abs(heads_removed(block, p) - want), p.params))


def max_removable(block: BlockAdapter, multiple: int = 1, kv_groups: bool = False) -> int:
    """Most a block can lose: all but one query head and all but ``multiple`` channels."""
    heads = max(plan_params(block, k, r, 0) for r, k in head_options(block, kv_groups))
    return round(heads + (block.n_channels - width_multiple(block, multiple)) * channel_params(block))


def block_parameters(blocks: list[BlockAdapter]) -> int:
    """Parameters of these decoder blocks (norms included): the basis of ``--sparsity-basis blocks``."""
    return sum(p.numel() for b in blocks for p in b.layer.parameters())


def check_budget(blocks: list[BlockAdapter], basis_params: int, sparsity: float, multiple: int,
                 kv_groups: bool = False, basis: str = "total") -> float:
    """Per-block target, or a clear error when the block range cannot hold the budget."""
    if not blocks:
        raise ConfigError("the block range is empty")
    target = sparsity * basis_params / len(blocks)
    worst = min(max_removable(b, multiple, kv_groups) for b in blocks)
    if target > worst:
        reach = worst * len(blocks) / basis_params
        what = "model's parameters" if basis == "total" else "decoder blocks' parameters"
        raise ConfigError(
            f"--sparsity {sparsity} cannot be met inside {len(blocks)} blocks: at most {reach:.3f} of the "
            f"{what} can be removed there; widen --layers or lower --sparsity"
        )
    return target
