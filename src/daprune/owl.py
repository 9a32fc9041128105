"""``--schedule owl``: each block's share from its outlier ratio (OWL, Yin et al. 2023, arXiv 2310.05175).

OWL observed that the layers of an LLM that hold many *outlier* weights, by the Wanda score
|W_ij| * ||X_j||, are the ones that suffer most from pruning, and gave each layer a sparsity that falls
linearly with its outlier ratio. It was proposed for unstructured sparsity; here it spreads a structured budget
over blocks, so the same pipeline compares three allocation rules: FLAP's (``adaptive``), OWL's and ours
measured (``sensitivity``).

1. One pass over the dense blocks on the scoring rows collects each block's input second moments of its
   linears (q/k/v, o, gate/up, down). A block's outlier ratio D is the fraction of its weights whose score
   |W_ij| * sqrt(E[x_j^2]) exceeds ``threshold`` (OWL's M, default 5) times the mean score over all of the
   block's linears together, as OWL's reference code pools a layer's scores.
2. The ratios are scaled to [0, 1] over the candidate blocks, n_i = (D_i - min) / (max - min), and block i
   loses the fraction s + 2 * lam * (n_mean - n_i) of its parameters: shares span 2 * lam (OWL's lambda,
   default 0.08) around the average share s, fewer for more outliers, and with n_mean the parameter-weighted
   mean they add up to the budget exactly.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import torch

from daprune.errors import ConfigError
from daprune.experts import is_moe
from daprune.schedule import block_parameters, max_removable

if TYPE_CHECKING:
    from daprune.models.adapter import BlockAdapter, ModelAdapter
    from daprune.pipeline import BlockPruner
    from daprune.stats import Moments

OWL_LAMBDA = 0.08  # OWL's default spread (its paper's LLaMA settings use 0.08)
OWL_THRESHOLD = 5.0  # OWL's M: an outlier scores above M times the mean
ROLES = ("attn_in", "o_in", "ffn_in", "down_in")


def outlier_ratio(weights_and_inputs: list[tuple[torch.Tensor, torch.Tensor]], threshold: float) -> float:
    """Fraction of all weights whose Wanda score |W_ij| * norm_j exceeds ``threshold`` x the pooled mean score.

    ``weights_and_inputs``: (weight [out, in], per-input-channel RMS [in]) for every linear of the block.
    """
    total, count = 0.0, 0
    for w, rms in weights_and_inputs:  # two passes, one linear at a time: a 7B block never exists as one tensor
        total += float((w.float().abs() * rms.float()[None, :]).sum(dtype=torch.float64))
        count += w.numel()
    cut = threshold * total / count
    above = sum(int((w.float().abs() * rms.float()[None, :] > cut).sum()) for w, rms in weights_and_inputs)
    return above / count


def block_outlier_ratio(block: BlockAdapter, moments: dict[str, Moments], threshold: float) -> float:
    """The block's outlier ratio from the input moments of its four linear roles."""
    from daprune.block_ops import role_linears

    pairs = []
    for role in ROLES:
        rms = torch.diagonal(moments[role].second).clamp_min(0).sqrt()
        pairs += [(lin.weight, rms) for lin in role_linears(block, role)]
    return outlier_ratio(pairs, threshold)


def owl_fractions(ratios: dict[int, float], sizes: dict[int, int], share: float, lam: float) -> dict[int, float]:
    """Each block's fraction of its parameters to remove: ``share`` on average (parameter-weighted), spread
    over 2 * ``lam`` by the min-max scaled outlier ratios, fewer for more outliers."""
    lo, hi = min(ratios.values()), max(ratios.values())
    scaled = {i: (r - lo) / (hi - lo) if hi > lo else 0.0 for i, r in ratios.items()}
    total = sum(sizes.values())
    mean = sum(scaled[i] * sizes[i] for i in ratios) / total
    return {i: share + 2 * lam * (mean - scaled[i]) for i in ratios}


@torch.no_grad()
def owl_targets(adapter: ModelAdapter, pruner: BlockPruner, x: torch.Tensor, contexts: list[dict], blocks: range,
                budget: float, lam: float, threshold: float) -> tuple[dict[int, float], dict]:
    """Per-block parameter targets (summing to ``budget``) and the report entry (ratios, fractions, settings).

    ``adapter`` may be a streaming view; ``x`` holds the embedded scoring rows. Nothing is modified.
    """
    from daprune.block_ops import forward_rows

    t0 = time.perf_counter()
    cfg = pruner.cfg
    sizes = {i: block_parameters([adapter.block(i, adapter.layers()[i])]) for i in blocks}
    share = budget / sum(sizes.values())
    ratios: dict[int, float] = {}
    caps: dict[int, int] = {}
    h = x
    for j in range(adapter.n_layers):
        if j > blocks.stop - 1:
            break
        block, ctx = adapter.block(j), contexts[j]
        if j in blocks:
            if is_moe(block):
                raise ConfigError("--schedule owl scores every linear of a block; mixture-of-experts blocks are not "
                                  "supported (use --schedule sensitivity or uniform)")
            moments = pruner.collect(block, block, h, h, ctx, dict.fromkeys(ROLES, False))
            ratios[j] = block_outlier_ratio(block, moments, threshold)
            caps[j] = max_removable(block, cfg.channel_multiple, cfg.kv_groups)
        h = forward_rows(block, h, ctx, cfg.batch_size)
    fractions = owl_fractions(ratios, sizes, share, lam)
    bad = {i: f for i, f in fractions.items() if f < 0 or f * sizes[i] > caps[i]}
    if bad:
        i, f = next(iter(bad.items()))
        raise ConfigError(f"--schedule owl would give block {i} a share of {f:.0%} of its parameters (outside 0.."
                          f"{caps[i] / sizes[i]:.0%}); lower --owl-lambda or --sparsity")
    targets = {i: fractions[i] * sizes[i] for i in blocks}
    entry = {"mode": "owl", "lambda": lam, "threshold": threshold, "average_share": share, "budget": budget,
             "outlier_ratio": {str(i): r for i, r in ratios.items()},
             "targets": {str(i): t for i, t in targets.items()},
             "fractions": {str(i): f for i, f in fractions.items()},
             "seconds": time.perf_counter() - t0}
    return targets, entry
