"""Pruning the FFN of a mixture-of-experts block: every expert a depth-2 unit, one channel count per layer.

The pipeline prunes an MoE block's attention heads as for a dense block; this module does its FFN part.
Each routed expert (and the shared expert, if any) is ranked on its own routing-weighted statistics
(:func:`daprune.models.moe.expert_moments`) by the same rule as a dense FFN: greedy output
approximation or OBS for the output criterion, the criterion's scores otherwise. Every routed expert then
keeps the same number of channels, its own best ones; the shared expert keeps the same fraction.

Experts the calibration never routes to have no statistics. What happens to them is the user's choice
(``--unrouted-experts``): ``magnitude`` ranks their channels by weight magnitude (depth-2 norm),
``uniform`` by the statistics of *every* token reaching the layer (as if the router sent them all),
``keep`` leaves the layer's experts unpruned (its heads are still pruned; the achieved sparsity, which
report.json counts from the written weights, is then lower).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from daprune.config import UNROUTED_DEFAULT, PruneConfig
from daprune.criteria.base import get_criterion
from daprune.errors import ConfigError
from daprune.models.moe import FFNUnit, MoEBlock, expert_moments
from daprune.selection import obs_ranking
from daprune.stats import BlockStats, Moments

if TYPE_CHECKING:
    from daprune.models.adapter import ModelAdapter
    from daprune.pipeline import BlockPruner

# criteria whose FFN scores read only the FFN weights and the down-projection input: they apply to an expert
_EXPERT_CRITERIA = ("second-moment", "l1", "l2", "random", "depth1", "depth2", "wanda-sp")


def is_moe(block) -> bool:
    return getattr(block, "is_moe", False)


def check_moe_fit(adapter: ModelAdapter, cfg: PruneConfig) -> None:
    """Refuse, before any work, settings that have no meaning for expert FFNs (instead of ignoring them)."""
    if not any(is_moe(adapter.block(i)) for i in cfg.block_range(adapter.n_layers)):
        if cfg.unrouted_experts != UNROUTED_DEFAULT:
            raise ConfigError(f"--unrouted-experts sets how experts no calibration token reaches are pruned; this "
                              f"{adapter.config.model_type} model has no experts in the pruned blocks: drop it")
        return
    what = f"this {adapter.config.model_type} model's FFNs are mixtures of experts"
    if cfg.ffn_criterion not in _EXPERT_CRITERIA:
        raise ConfigError(f"--ffn-criterion {cfg.ffn_criterion} is not defined on experts ({what}); "
                          f"choose from {', '.join(_EXPERT_CRITERIA)}")
    if cfg.head_criterion.startswith("taylor"):
        raise ConfigError(f"--head-criterion {cfg.head_criterion} needs gradients of every block linear, which "
                          f"{what} do not have as linears; use similarity, second-moment, wanda-sp, l1, l2 or random")
    if cfg.recovery != "none":
        raise ConfigError(f"--recovery {cfg.recovery} is not implemented for mixture-of-experts blocks ({what})")
    if cfg.error_weight != "uniform":  # the experts' own rankings read no output weight
        raise ConfigError(f"--error-weight {cfg.error_weight} is not implemented for mixture-of-experts blocks "
                          f"({what})")
    if cfg.schedule != "uniform":
        raise ConfigError(f"--schedule {cfg.schedule} is not implemented for mixture-of-experts blocks ({what})")
    if cfg.head_split == "measured":
        raise ConfigError(f"--head-split measured is not implemented for mixture-of-experts blocks ({what}); "
                          "use auto, paper or ffn-only")
    if cfg.compensate_mean:  # the expert path ranks and slices experts on their own; no bias is folded there
        raise ConfigError(f"--compensate-mean is not implemented for mixture-of-experts blocks ({what})")


def unit_stats(block: MoEBlock, x: torch.Tensor, ctx: dict, cfg: PruneConfig, full_cov: bool = False
               ) -> list[Moments | None]:
    """Statistics of every FFN unit of ``block`` (``ffn_units()`` order); None for an unrouted expert."""
    routed, shared = expert_moments(block, x, ctx, cfg.batch_size, full_cov)
    out: list[Moments | None] = [m if m.routed else None for m in routed]
    return out + ([shared] if shared is not None else [])


def unit_removals(block: MoEBlock, channels: int) -> list[int]:
    """Channels each unit loses when every routed expert loses ``channels``."""
    return [channels] * block.n_experts + ([block.shared_removed(channels)] if block.shared is not None else [])


class ExpertRanker:
    """Removal orders of every FFN unit of one MoE block, from its statistics (``unit_stats``)."""

    def __init__(self, pruner: BlockPruner, block: MoEBlock, stats: list[Moments | None], x: torch.Tensor,
                 ctx: dict):
        self.pruner, self.block, self.stats = pruner, block, stats
        self.units = block.ffn_units()
        self.x, self.ctx = x, ctx
        self._uniform: list[Moments] | None = None
        self._orders: dict[int, torch.Tensor] = {}
        for unit, mom in zip(self.units, stats, strict=True):
            unit.tokens = 0 if mom is None else getattr(mom, "routed", mom.n)  # shared expert: every token

    def unrouted(self) -> list[int]:
        return [e for e, m in enumerate(self.stats[: self.block.n_experts]) if m is None]

    def rule(self, unit: FFNUnit) -> str:
        """This unit's selection rule: as for a dense FFN, with the tokens that reached this unit."""
        return self.pruner.selection(unit, tokens=unit.tokens)

    def unit_moments(self, u: int) -> Moments:
        """The statistics unit ``u`` is ranked on (``uniform`` policy: every token's, for an unrouted expert)."""
        if self.stats[u] is not None:
            return self.stats[u]
        if self._uniform is None:
            self._uniform, _ = expert_moments(self.block, self.x, self.ctx, self.pruner.cfg.batch_size,
                                              all_tokens=True)
        return self._uniform[u]

    def order(self, u: int, count: int) -> tuple[torch.Tensor, torch.Tensor | None, str]:
        """Removal order of unit ``u`` (the first ``count`` to remove), OBS's compensated down weight (or
        None), and the rule that chose it (an unrouted expert: "magnitude", or "greedy" on every token)."""
        unit = self.units[u]
        if self.stats[u] is None and self.pruner.cfg.unrouted_experts == "magnitude":
            scores = get_criterion("depth2").ffn_scores(unit, BlockStats())
            return torch.sort(scores.float(), stable=True).indices, None, "magnitude"
        mom = self.unit_moments(u)
        rule = self.rule(unit) if self.stats[u] is not None else "greedy"
        if rule == "obs" and count:
            order, w = obs_ranking(unit.ffn_out().weight.float(), mom.second, count, self.pruner.cfg.obs_damp)
            return order, w, rule
        return self.pruner.ffn_ranking(unit, BlockStats(down_in=mom), count, rule=rule), None, rule

    def error(self, channels: int, most: int) -> float:
        """Estimated output energy (per token) removed by cutting ``channels`` of every expert, summed over the
        units with statistics, for the head/FFN split decision. Like the dense estimate it is uncompensated
        (greedy order even under OBS); orders are computed once, for ``most`` channels, and their prefixes
        reused (a greedy order's prefix is the greedy choice for fewer channels)."""
        total = 0.0
        for u, count in enumerate(unit_removals(self.block, channels)):
            if not count or self.stats[u] is None:
                continue
            if u not in self._orders:
                stats = BlockStats(down_in=self.stats[u])
                most_u = unit_removals(self.block, most)[u]
                rule = "score" if self.rule(self.units[u]) == "score" else "greedy"
                self._orders[u] = self.pruner.ffn_ranking(self.units[u], stats, most_u, rule=rule)
            rm = self._orders[u][:count]
            d = self.units[u].ffn_out().weight.float()[:, rm]
            s = self.stats[u].second[rm][:, rm]
            total += float(torch.einsum("oi,ij,oj->", d, s, d))
        return total


def prune_experts(pruner: BlockPruner, block: MoEBlock, x: torch.Tensor, ctx: dict, channels: int) -> dict:
    """Remove ``channels`` of every routed expert (and the shared expert's share) of ``block``, in place.

    ``x``: the scoring rows of the pruned stream (statistics are collected after the heads were cut).
    Returns the report entry: tokens routed to each expert, kept channels, unrouted experts and policy.
    """
    cfg = pruner.cfg
    stats = unit_stats(block, x, ctx, cfg)
    ranker = ExpertRanker(pruner, block, stats, x, ctx)
    unrouted = ranker.unrouted()
    info = {"tokens": [u.tokens for u in ranker.units[: block.n_experts]], "unrouted": unrouted,
            "unrouted_policy": cfg.unrouted_experts if unrouted else None}
    skip = bool(unrouted) and cfg.unrouted_experts == "keep"
    removals = unit_removals(block, 0 if skip else channels)
    keeps, rules = [], []
    for u, count in enumerate(removals):
        unit = ranker.units[u]
        order, compensated, rule = ranker.order(u, count)
        if compensated is not None:  # OBS: the kept columns absorb the removed ones (writes the fused view)
            unit.ffn_out().weight.data.copy_(compensated.to(unit.ffn_out().weight.dtype))
        keeps.append(torch.sort(order[count:]).values.tolist())
        rules.append(rule)
    if channels and not skip:
        shared_keep = keeps[block.n_experts] if block.shared is not None else None
        block.slice_experts(keeps[: block.n_experts], shared_keep)
    info.update({"kept_channels": block.n_channels, "selection": sorted(set(rules)),
                 "skipped": skip})
    if block.shared is not None:
        info["shared_kept_channels"] = block.n_shared
    return info

