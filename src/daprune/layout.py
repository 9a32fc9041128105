"""``--layout uniform``: one shared split for every block, so the family's plain config states the model.

Per-layer pruning lets every block choose its own heads/channels split (and leaves blocks outside
``--layers`` dense), so config.json has to record per-block shapes and only remote code (or daprune)
loads the folder. Runtimes that take only the family's own config (vanilla transformers, vLLM, TGI,
TensorRT-LLM, llama.cpp's per-family graphs) need every block at the same widths.

What is still free under that constraint, and chosen here by measurement: *which* split all blocks share,
and, inside each block, *which* heads and channels it keeps at those widths. Before any pruning, one pass
over the dense blocks (the scoring rows only) computes, for every candidate split, the same output-error
estimate that ``--head-split auto`` uses per block (``BlockPruner.choose_plan``); the split with the least
total over all blocks is given to every block. The pipeline then prunes block by block as usual (each
block choosing its own heads and channels on the stream the earlier pruned blocks produce).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from daprune.errors import ConfigError
from daprune.schedule import BlockPlan, paper_plan

if TYPE_CHECKING:
    from daprune.models.adapter import ModelAdapter
    from daprune.pipeline import BlockPruner


def _shape_key(block) -> tuple:
    return tuple(sorted(block.shape().items()))


@torch.no_grad()
def uniform_plan(adapter: ModelAdapter, pruner: BlockPruner, x: torch.Tensor, contexts: list[dict]
                 ) -> tuple[BlockPlan, dict]:
    """The split every block gets, and the report entry (each candidate's estimated error summed over blocks).

    ``adapter`` may be a streaming view (blocks loaded on access); ``x`` is the embedded scoring rows.
    Nothing is modified.
    """
    from daprune.block_ops import forward_rows
    from daprune.pipeline import BlockRecord, _plan_key

    cfg = pruner.cfg
    first = adapter.block(0)
    shape = _shape_key(first)
    # a family whose config derives head_dim from the head count (GPT-2, OPT) cannot state fewer heads
    heads_allowed = pruner.heads_allowed(first) and adapter.head_dim_key is not None
    plans = pruner.candidates(first, heads=heads_allowed)
    if not plans:
        raise ConfigError("--layout uniform: the per-block budget cannot be met at one shared width")
    entry: dict = {"mode": "uniform", "heads": "allowed" if heads_allowed else "kept (the family's config cannot "
                   "state fewer heads)" if pruner.head_crit is not None else "kept"}
    if cfg.head_split == "ffn-only" or len(plans) == 1:
        return plans[0], {**entry, "plan": _describe(plans[0])}
    if cfg.head_split == "paper":
        plan = paper_plan(first, pruner.target, cfg.channel_multiple, cfg.kv_groups) or plans[0]
        return plan, {**entry, "plan": _describe(plan)}
    totals = {_plan_key(p): 0.0 for p in plans}
    for i in range(adapter.n_layers):
        block, ctx = adapter.block(i), contexts[i]
        if _shape_key(block) != shape:
            raise ConfigError(f"--layout uniform: block {i} has other widths than block 0 ({block.shape()} vs "
                              f"{first.shape()}); a model whose blocks already differ cannot be made uniform")
        rec = BlockRecord(i, True)
        stats, head_imp, redundant = pruner.dense_statistics(block, x, ctx, rec)
        y = forward_rows(block, x, ctx, cfg.batch_size)
        pruner.choose_plan(block, stats, head_imp, redundant, rec, (x, y, ctx), candidates=plans)
        for key, row in rec.split_errors.items():
            totals[key] += row.get("measured", row["estimate"])
        x = y
    best = min(plans, key=lambda p: totals[_plan_key(p)])
    return best, {**entry, "plan": _describe(best), "total_error": totals}


def _describe(plan: BlockPlan) -> dict:
    return {"heads_per_group": plan.heads_per_group, "kv_groups": plan.kv_groups, "channels": plan.channels,
            "params": plan.params}
