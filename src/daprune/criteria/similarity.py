"""Head redundancy by Jensen-Shannon divergence of attention maps (method.md section 3, Algorithm 2).

Divergences are accumulated batch by batch (``JSAccumulator``), so attention maps are never stored.
Selection respects GQA: a pruned model stays a valid GQA model, see :func:`select_heads`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def js_rows(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence (nats, in [0, ln 2]) between matching rows of two distributions.

    Uses xlogy so zero-probability entries (the causal mask) contribute 0, as 0 log 0 = 0.
    """
    m = 0.5 * (p + q)
    kl_pm = (torch.xlogy(p, p) - torch.xlogy(p, m)).sum(-1)
    kl_qm = (torch.xlogy(q, q) - torch.xlogy(q, m)).sum(-1)
    return (0.5 * (kl_pm + kl_qm)).clamp_min(0.0)


class JSAccumulator:
    """Mean over all query rows of JS(P_i row || P_j row), for every head pair."""

    def __init__(self, n_heads: int):
        self.sum = torch.zeros(n_heads, n_heads, dtype=torch.float64)
        self.rows = 0

    def update(self, probs: torch.Tensor) -> None:
        """probs: [batch, heads, q, k] attention probabilities.

        Per row, JS(P||Q) = (sum p log p + sum q log q) / 2 - sum m log m with M = (P + Q) / 2, so each head's
        own sum p log p is taken once per batch and a pair costs one ``xlogy`` (not four as in
        :func:`js_rows`; this was a tenth of a default prune's time). Row sums are fp32 over at most a
        sequence length of terms, each pair's total is accumulated in fp64.
        """
        probs = probs.float()
        h = probs.shape[1]
        own = [torch.xlogy(probs[:, i], probs[:, i]).sum(-1) for i in range(h)]  # [batch, q] per head
        pairs = torch.zeros(h, h, dtype=torch.float64, device=probs.device)  # on the maps' device: no sync per pair
        for i in range(h):
            for j in range(i + 1, h):
                m = 0.5 * (probs[:, i] + probs[:, j])
                rows = 0.5 * (own[i] + own[j]) - torch.xlogy(m, m).sum(-1)
                pairs[i, j] = rows.double().clamp_min(0.0).sum()
        self.sum += (pairs + pairs.T).cpu()
        self.rows += probs.shape[0] * probs.shape[2]

    @property
    def divergence(self) -> torch.Tensor:
        return (self.sum / max(self.rows, 1)).float()


def algorithm2(divergence: torch.Tensor, tau: float, importance: torch.Tensor | None = None) -> list[int]:
    """Heads chosen for pruning because they duplicate another head, in the order chosen.

    Visit pairs in ascending divergence; while D_ij < tau and neither head is chosen yet, choose one
    of the pair. The paper chooses "i"; pair order is arbitrary, so we choose the less important
    head of the pair (ties: the higher index), which keeps the more useful of two duplicates.
    """
    h = divergence.shape[0]
    pairs = sorted(
        ((float(divergence[i, j]), i, j) for i in range(h) for j in range(i + 1, h)),
        key=lambda t: (t[0], t[1], t[2]),
    )
    chosen: list[int] = []
    for d, i, j in pairs:
        if not d < tau:
            break
        if i in chosen or j in chosen:
            continue
        if importance is not None and float(importance[i]) < float(importance[j]):
            chosen.append(i)
        else:
            chosen.append(j)
    return chosen


def select_heads(
    groups: Sequence[Sequence[int]],
    per_group: int,
    importance: torch.Tensor,
    redundant: Sequence[int] = (),
) -> list[int]:
    """Pick ``per_group`` query heads to prune in every KV group.

    GQA rule (documented in the README): every KV group loses the same number of query heads, so
    the pruned block is an ordinary GQA block with a smaller group size, loadable by vanilla
    transformers, and no KV head (nor any of the KV cache) is lost. Redundant heads from Algorithm 2
    go first (in their order), then the least important remaining heads of each group.
    """
    if per_group <= 0:
        return []
    if any(per_group >= len(g) for g in groups):
        raise ValueError(f"cannot prune {per_group} heads from a group of {min(len(g) for g in groups)}")
    pruned: list[int] = []
    for group in groups:
        members = set(group)
        picks = [h for h in redundant if h in members][:per_group]
        rest = sorted((h for h in group if h not in picks), key=lambda h: (float(importance[h]), h))
        picks += rest[: per_group - len(picks)]
        pruned += picks
    return sorted(pruned)


def select_kv_groups(groups: Sequence[Sequence[int]], n_groups: int, importance: torch.Tensor,
                     redundant: Sequence[int] = ()) -> list[int]:
    """Whole KV groups to prune (multi-head attention: single heads); returns their query heads.

    Groups all of whose heads Algorithm 2 found redundant go first (in the order it found them), then the
    groups of least total importance.
    """
    if n_groups <= 0:
        return []
    if n_groups >= len(groups):
        raise ValueError(f"cannot prune {n_groups} of {len(groups)} KV groups")
    pos = {h: i for i, h in enumerate(redundant)}

    def key(g: int):
        heads = groups[g]
        if all(h in pos for h in heads):
            return (0, max(pos[h] for h in heads), g)
        return (1, float(sum(importance[h] for h in heads)), g)

    ranked = sorted(range(len(groups)), key=key)
    return sorted(h for g in ranked[:n_groups] for h in groups[g])


def select_head_plan(groups: Sequence[Sequence[int]], per_group: int, n_groups: int, importance: torch.Tensor,
                     redundant: Sequence[int] = ()) -> list[int]:
    """Heads to prune: ``n_groups`` whole KV groups, then ``per_group`` query heads of each remaining group."""
    gone = select_kv_groups(groups, n_groups, importance, redundant)
    left = [g for g in groups if g[0] not in gone]
    return sorted(gone + select_heads(left, per_group, importance, redundant))


MAX_JS = math.log(2.0)
