"""``--schedule sensitivity``: each block's share of the budget from its measured effect on the model's output.

A fixed rule (the paper's 4:-2 with the same share everywhere, FLAP's per-layer z-scores) cannot know that one
block feeds an attention sink the whole model leans on while its neighbour is nearly redundant; the
difference between allocations is larger than between criteria (issue "Quality": x1.9 on SmolLM2). So the
budget is spent where it costs least, by measurement:

1. One pass over the dense model on a few calibration rows. At every candidate block, the block is pruned
   alone at a few sizes (multiples of the average share), exactly as the pipeline would prune it there
   (head/FFN split, heads, channels), and the model is run on from the pruned block through the remaining
   *dense* blocks to the LM head. Its cost at that size is the mean per-token KL divergence of the output
   distribution from the dense model's, KL(p_dense || p_pruned): the quantity the pruned model should keep
   small, measured rather than estimated, so a block whose damage is amplified downstream shows it.
   Every perturbed stream advances block by block with the dense one, so each block is loaded once
   (streaming works) and the cost is a few block forwards per (block, size) pair. A trial block is compensated
   as the prune compensates it (OBS); with ``--sensitivity-refit`` it also gets the post-pruning re-fit of its
   kept o_proj / down_proj columns (strength chosen on the held-out rows), so that a block whose damage the re-fit
   repairs is priced as the pipeline will leave it rather than as OBS alone leaves it (one more statistics pass
   per trial).
2. Costs are taken as additive over blocks. Each block's measured (parameters removed, KL) points, with
   (0, 0), are reduced to their lower convex hull; the budget goes to hull segments in ascending order of
   KL per parameter until it is met, the last one in part. A block's share is thus a parameter count
   between measured sizes (the pipeline's own rounding to whole heads and channels follows), possibly zero:
   such a block stays dense.

The pipeline then prunes block by block with these shares on the stream earlier pruned blocks produce,
choosing each block's heads and channels as usual.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from daprune.allocation_search import SEARCH_MULTIPLES, mean_kl
from daprune.criteria.similarity import select_head_plan
from daprune.errors import ConfigError
from daprune.schedule import block_parameters, max_removable

if TYPE_CHECKING:
    from daprune.models.adapter import BlockAdapter, ModelAdapter
    from daprune.pipeline import BlockPruner

# candidate sizes per block, as multiples of the average share (capped at what the block can lose)
SIZE_MULTIPLES = (0.5, 1.0, 1.5, 2.0, 3.0)
KL_POSITIONS_STRIDE = 4  # the LM head (up to 262k outputs) runs on every 4th position only


@dataclass
class Curve:
    """One block's measured cost: parameters removed by the plan at each size, and the resulting KL."""

    block: int
    params: list[int]
    kl: list[float]


def lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """Lower convex hull of (x, y) points sorted by x, starting at the smallest x (monotone chain)."""
    hull: list[tuple[float, float]] = []
    for p in sorted(points):
        while len(hull) >= 2:
            (x1, y1), (x2, y2) = hull[-2], hull[-1]
            if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) <= 0:  # hull[-1] lies on or above the chord
                hull.pop()
            else:
                break
        if hull and p[0] == hull[-1][0]:
            continue  # same size measured twice (capped multiples): keep the first (lower after sorting)
        hull.append(p)
    return hull


def allocate(curves: list[Curve], budget: float) -> dict[int, float]:
    """Parameters each block loses: ``budget`` in all, spent on hull segments by ascending KL per parameter.

    Raises ConfigError when even the largest measured sizes cannot hold the budget.
    """
    segments = []  # (slope, block, order within block, params of the segment)
    for c in curves:
        hull = lower_hull([(0.0, 0.0)] + [(float(p), float(k)) for p, k in zip(c.params, c.kl, strict=True)])
        for n, ((x1, y1), (x2, y2)) in enumerate(itertools.pairwise(hull)):
            segments.append(((y2 - y1) / (x2 - x1), c.block, n, x2 - x1))
    most = sum(s[3] for s in segments)
    if most < budget:
        raise ConfigError(f"the sensitivity schedule measured sizes that free at most {most:,.0f} parameters, fewer "
                          f"than the budget {budget:,.0f}; widen --layers or lower --sparsity")
    targets = {c.block: 0.0 for c in curves}
    left = budget
    for _, block, _, size in sorted(segments):
        if left <= 0:
            break
        take = min(size, left)
        targets[block] += take
        left -= take
    return targets


@torch.no_grad()
def sensitivity_targets(adapter: ModelAdapter, pruner: BlockPruner, x: torch.Tensor, contexts: list[dict],
                        blocks: range, budget: float, nsamples: int, *, head_logits=None, search: int = 0,
                        search_nsamples: int = 8, seed: int = 0, progress: bool = False, refit: bool = False,
                        heldout: torch.Tensor | None = None, multiples: tuple[float, ...] | None = None,
                        kl_extra: torch.Tensor | None = None) -> tuple[dict[int, float], dict]:
    """Per-block parameter targets (summing to ``budget``) and the report entry with every measured curve.

    ``adapter`` may be a streaming view (blocks loaded on access); ``x`` holds the embedded scoring rows (their
    statistics choose what each trial removes); the KL is measured on the first ``nsamples`` of them.
    ``head_logits`` maps a last-layer hidden state to logits (default ``adapter.logits``). Nothing is modified.
    ``search`` > 0: that many generations of :mod:`daprune.allocation_search` refine the additive allocation on the
    first ``search_nsamples`` rows (the trial blocks are then kept in memory, one per measured size).
    ``refit`` (``--sensitivity-refit``): every trial block also gets the post-pruning re-fit the pipeline gives it
    (:meth:`BlockPruner.trial_block` with rows), fitted on ``x`` and its strength chosen on the embedded
    ``heldout`` rows, so a block whose damage the re-fit repairs is priced as the pipeline will leave it.
    ``multiples`` (``--sensitivity-sizes``): the sizes measured, as multiples of the average share (default
    SIZE_MULTIPLES); a finer grid lets the allocation stop between today's points at the price of more trials.
    ``kl_extra`` (``--sensitivity-copy-rows``): embedded rows the KL is also measured on, after the first
    ``nsamples``; they run through every dense and trial block, but no statistic reads them.
    """
    from daprune.block_ops import forward_rows
    from daprune.pipeline import BlockRecord

    t0 = time.perf_counter()
    cfg = pruner.cfg
    bs = cfg.batch_size
    logits_of = head_logits or adapter.logits
    # parameter counts from the model's own layers (``block(i, layer)`` never loads a streamed block's tensors)
    sizes = {i: block_parameters([adapter.block(i, adapter.layers()[i])]) for i in blocks}
    share = budget / sum(sizes.values())  # the average fraction of a candidate block's parameters
    ns = max(1, min(nsamples, x.shape[0]))
    n = x.shape[0]
    # dense stream: every scoring row (statistics), then the held-out rows (only a trial's re-fit reads them)
    dense = x if heldout is None or not refit else torch.cat([x, heldout.to(x.device, x.dtype)])
    extra = None if kl_extra is None else kl_extra.to(x.device, x.dtype)  # KL-only rows, beside the dense stream
    trials: list[tuple[int, int, torch.Tensor]] = []  # (block, params removed, stream of the first ns rows)
    kept: dict[int, list[tuple[int, BlockAdapter]]] = {}  # --allocation-search: every block's trial blocks
    if search and multiples:
        raise ValueError("the allocation search steps between its own sizes (SEARCH_MULTIPLES)")
    multiples = SEARCH_MULTIPLES if search else (multiples or SIZE_MULTIPLES)
    saved = dict(pruner.targets)
    # the pass runs every block at every size and can take many minutes on a real model: show where it is
    layers = tqdm(range(adapter.n_layers), desc="measuring sensitivity", leave=False, disable=not progress)
    try:
        for j in layers:
            block, ctx = adapter.block(j), contexts[j]
            trials = [(i, p, forward_rows(block, h, ctx, bs)) for i, p, h in trials]  # dense block j downstream
            out = forward_rows(block, dense, ctx, bs)  # the dense block's output: the next block's input
            if j in blocks:
                stats, head_imp, redundant = pruner.dense_statistics(block, dense[:n], ctx, BlockRecord(j, True))
                rows = pruner.refit_rows(block, dense, out, ctx, n) if refit else None
                cap = max_removable(block, cfg.channel_multiple, cfg.kv_groups)
                seen: set[int] = set()
                kl_in = dense[:ns] if extra is None else torch.cat([dense[:ns], extra])  # every trial's KL rows
                for m in multiples:
                    pruner.targets[j] = min(m * share * sizes[j], cap)
                    plans = pruner.candidates(block)
                    if not plans:
                        continue
                    rec = BlockRecord(j, True)
                    plan = pruner.choose_plan(block, stats, head_imp, redundant, rec, None, candidates=plans)
                    if plan.params in seen or plan.params == 0:
                        continue
                    seen.add(plan.params)
                    heads = select_head_plan(block.head_groups(), plan.heads_per_group, plan.kv_groups, head_imp,
                                             redundant) if plan.heads_per_group or plan.kv_groups else []
                    removed = pruner.ffn_ranking(block, stats, plan.channels)[: plan.channels].tolist()
                    trial = pruner.trial_block(block, heads, removed, stats, rows)
                    trials.append((j, plan.params, forward_rows(trial, kl_in, ctx, bs)))
                    if search:
                        kept.setdefault(j, []).append((plan.params, trial))
            dense = out
            if extra is not None:
                extra = forward_rows(block, extra, ctx, bs)
    finally:
        layers.close()
        pruner.targets = saved
    ref = _log_probs(logits_of, dense[:ns] if extra is None else torch.cat([dense[:ns], extra]), bs)
    curves = {i: Curve(i, [], []) for i in blocks}
    for i, p, h in trials:
        lp = _log_probs(logits_of, h, bs)
        curves[i].params.append(p)
        curves[i].kl.append(mean_kl(ref, lp))
    targets = allocate(list(curves.values()), budget)
    entry = {"mode": "sensitivity", "measure": "mean per-token KL(dense || this block alone pruned"
             f"{' and re-fitted' if refit else ''}), every {KL_POSITIONS_STRIDE}th position", "nsamples": ns,
             "copy_rows": 0 if extra is None else extra.shape[0],
             "refit": refit, "refit_heldout_rows": dense.shape[0] - n,
             "size_multiples": list(multiples),
             "average_share": share, "budget": budget,
             "curves": {str(i): {"params": c.params, "kl": c.kl} for i, c in curves.items()}}
    if search:
        from daprune.allocation_search import search_targets

        entry["additive_targets"] = {str(i): t for i, t in targets.items()}
        levels = {i: sorted(kept.get(i, []), key=lambda pt: pt[0]) for i in blocks}
        targets, entry["search"] = search_targets(
            adapter.block, adapter.n_layers, contexts, levels, targets, share, sizes, x[:search_nsamples],
            lambda h: _log_probs(logits_of, h, bs), bs, search, seed, progress)
    entry.update({"targets": {str(i): t for i, t in targets.items()},
                  "fractions": {str(i): targets[i] / sizes[i] for i in blocks},
                  "seconds": time.perf_counter() - t0})
    return targets, entry


def _log_probs(logits_of, h: torch.Tensor, bs: int) -> torch.Tensor:
    """Log-probabilities (fp32) at every KL_POSITIONS_STRIDE-th position of the hidden states ``h``."""
    h = h[:, ::KL_POSITIONS_STRIDE]
    return torch.cat([torch.log_softmax(logits_of(h[s : s + bs]).float(), -1) for s in range(0, h.shape[0], bs)])

