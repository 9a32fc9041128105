"""FLAP's adaptive structure search: how much each block loses, decided globally before any pruning.

FLAP (An et al., AAAI 2024, "AL-AM" structure) observes that a score like the fluctuation metric has a
different scale in every layer, so a global threshold on raw scores would strip whole layers. It
therefore (1) computes every layer's scores on the dense model, (2) standardises them per layer and per
module type (z-scores over the layer's o_proj columns, resp. its FFN channels; for attention the
column z-scores are then averaged per head), and (3) sorts heads and channels of all layers together
and removes the lowest until the parameter budget is met, a head weighing as many parameters as it
frees. This module does the same on daprune's pipeline:

* one pass through the blocks on the dense stream (no pruning) collects each block's input moments
  and the criterion's scores (``head_column_scores`` when the criterion has it, as FLAP's attention
  metric does; otherwise the per-head scores are standardised directly);
* GQA: a pruned block must stay a valid GQA block, so heads are removed in units of one query head
  from *every* KV group. Unit k of a block removes the k-th least important head of each group; its
  score is the mean z-score of those heads (made non-decreasing in k so units are taken in order), and
  at least one head per group is kept;
* FFN channels are removed one by one in ascending z-score, keeping at least ``channel_multiple``
  channels, and the kept count is rounded down to a multiple of ``channel_multiple`` afterwards;
* units are taken in ascending z-score until the removed parameters reach the budget (FLAP instead
  picks the threshold nearest the budget, which may remove slightly less; here every row of the
  comparison must remove at least the same number of parameters).

The pipeline then prunes block by block with these plans; *which* heads/channels go is re-scored there
on the stream the earlier pruned blocks produce, like every other criterion.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from daprune.config import PruneConfig
from daprune.criteria.base import Criterion
from daprune.errors import ConfigError
from daprune.hooks import capture
from daprune.models.adapter import BlockAdapter, ModelAdapter
from daprune.schedule import BlockPlan, channel_params, group_params, head_unit_params, plan_params
from daprune.stats import BlockStats, Moments

log = logging.getLogger(__name__)


def standardise(x: torch.Tensor) -> torch.Tensor:
    """FLAP's per-layer z-score (unbiased std, as torch.std); a constant vector maps to zeros."""
    x = x.double()
    if x.numel() < 2:
        return torch.zeros_like(x)
    std = x.std()
    return (x - x.mean()) / (std if std > 0 else 1.0)


@dataclass(frozen=True)
class Unit:
    """One removable piece: a GQA head unit (one query head per group) or one FFN channel."""

    score: float
    kind: str  # "head" | "channel"
    block: int
    rank: int  # 1-based position inside its block and kind: unit k needs units 1..k-1 first
    params: int


def head_units(block: BlockAdapter, z_heads: torch.Tensor) -> list[Unit]:
    """Units k = 1..group_size-1: the k-th least important query head of every KV group.

    Multi-head attention (group size 1): unit k is the k-th least important head, all but one removable.
    """
    groups = block.head_groups()
    g = block.group_size
    if g < 2:
        if block.n_heads < 2:
            return []
        scores = torch.sort(z_heads.double()).values[: block.n_heads - 1]
        gp = group_params(block)
        return [Unit(float(scores[k]), "head", block.index, k + 1, gp) for k in range(len(scores))]
    ranked = torch.stack([torch.sort(z_heads[torch.tensor(grp)]).values for grp in groups])  # [kv, g]
    scores = torch.cummax(ranked.mean(0)[: g - 1], 0).values
    hu = head_unit_params(block)
    return [Unit(float(scores[k]), "head", block.index, k + 1, hu) for k in range(g - 1)]


def channel_units(block: BlockAdapter, z_channels: torch.Tensor, multiple: int) -> list[Unit]:
    """Channels in ascending z-score, all but ``multiple`` of them removable."""
    order = torch.sort(z_channels.double(), stable=True).values
    cp = channel_params(block)
    n_removable = block.n_channels - max(multiple, 1)
    return [Unit(float(order[r]), "channel", block.index, r + 1, cp) for r in range(n_removable)]


def select_units(units: list[Unit], target: float) -> dict[tuple[int, str], int]:
    """Take units in ascending score until >= ``target`` params; return {(block, kind): count}.

    Ties and the per-block order are respected by sorting on (score, rank): within a block and kind the
    scores are non-decreasing in rank, so unit k is always taken after unit k-1.
    """
    taken: dict[tuple[int, str], int] = {}
    removed = 0
    for u in sorted(units, key=lambda u: (u.score, u.rank, u.kind, u.block)):
        if removed >= target:
            break
        key = (u.block, u.kind)
        if taken.get(key, 0) != u.rank - 1:  # cannot happen with monotone scores; guard anyway
            continue
        taken[key] = u.rank
        removed += u.params
    if removed < target:
        raise ConfigError(f"the adaptive schedule cannot remove {target:.0f} parameters inside the block range")
    return taken


def _roles(needs: frozenset[str]) -> list[str]:
    unsupported = needs & {"grads", "attn_probs"}
    if unsupported:
        raise ConfigError(f"the adaptive schedule cannot provide {', '.join(sorted(unsupported))} to a criterion; "
                          "use --schedule uniform with this criterion")
    return sorted({"o_in", "down_in"} | (needs & {"attn_in", "ffn_in"}))


@torch.no_grad()
def block_scores(block: BlockAdapter, x: torch.Tensor, ctx: dict, roles: list[str], ffn_crit: Criterion,
                 head_crit: Criterion | None, bs: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Run ``block`` over ``x`` collecting input moments; return (output, z FFN channels, z heads)."""
    lin = {"attn_in": block.attn_in()[0], "o_in": block.attn_out(), "ffn_in": block.ffn_in()[0],
           "down_in": block.ffn_out()}
    moments = {r: Moments(f"block {block.index} {r}") for r in roles}
    outs = []
    for s in range(0, x.shape[0], bs):
        with capture({r: lin[r] for r in roles}) as got:
            outs.append(block.forward(x[s : s + bs], ctx))
        for r in roles:
            moments[r].update(got[r][0])
    stats = BlockStats(attn_in=moments.get("attn_in"), o_in=moments["o_in"], ffn_in=moments.get("ffn_in"),
                       down_in=moments["down_in"])
    z_ffn = standardise(ffn_crit.ffn_scores(block, stats).float())
    z_heads = None
    if head_crit is not None:
        columns = getattr(head_crit, "head_column_scores", None)
        if columns is not None:  # FLAP: standardise per o_proj column, then average per head
            z_cols = standardise(columns(block, stats).float())
            z_heads = z_cols.view(block.n_heads, block.head_dim).mean(1)
        else:
            z_heads = standardise(head_crit.head_scores(block, stats).float())
    return torch.cat(outs), z_ffn, z_heads


@torch.no_grad()
def adaptive_plans(adapter: ModelAdapter, xp: torch.Tensor, contexts: list[dict], layer_range: range,
                   total_target_params: float, ffn_crit: Criterion, head_crit: Criterion | None,
                   cfg: PruneConfig) -> dict[int, BlockPlan]:
    """Per-block plans removing >= ``total_target_params`` in ``layer_range``, chosen across blocks.

    ``xp``: the embedded calibration tokens (input of block 0). Blocks are run dense, in order, up to
    the end of the range; nothing is modified.
    """
    needs = ffn_crit.needs | (head_crit.needs if head_crit is not None else frozenset())
    roles = _roles(needs)
    units: list[Unit] = []
    x = xp
    for i in range(layer_range.stop):
        block, ctx = adapter.block(i), contexts[i]
        if i not in layer_range:
            x = torch.cat([block.forward(x[s : s + cfg.batch_size], ctx) for s in range(0, x.shape[0], cfg.batch_size)])
            continue
        x, z_ffn, z_heads = block_scores(block, x, ctx, roles, ffn_crit, head_crit, cfg.batch_size)
        units += channel_units(block, z_ffn, cfg.channel_multiple)
        if z_heads is not None:
            units += head_units(block, z_heads)
    taken = select_units(units, total_target_params)
    plans: dict[int, BlockPlan] = {}
    m = max(cfg.channel_multiple, 1)
    for i in layer_range:
        block = adapter.block(i)
        k = taken.get((i, "head"), 0)
        c = taken.get((i, "channel"), 0)
        keep = block.n_channels - c
        c += keep % m  # kept channels must be a multiple: remove a few more (stays >= m, see channel_units)
        if block.group_size == 1:  # multi-head attention: k whole heads
            plans[i] = BlockPlan(0, c, plan_params(block, 0, k, c), kv_groups=k)
        else:
            plans[i] = BlockPlan(k, c, k * head_unit_params(block) + c * channel_params(block))
    log.info("adaptive plans: %s", {i: (p.heads_per_group, p.kv_groups, p.channels) for i, p in plans.items()})
    return plans
