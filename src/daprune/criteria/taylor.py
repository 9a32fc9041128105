"""LLM-Pruner's first-order Taylor importance (Ma et al., NeurIPS 2023), without its LoRA retraining.

Salience of a weight: s = w * dL/dw, L the mean next-token NLL over the calibration windows (the
first-order change of the loss when w is zeroed). Following LLM-Pruner's ``TaylorImportance``:

* ``taylor-e1`` (their ``param_first``, element-wise): per unit, sum over its weights of |s|.
* ``taylor-vector`` (their ``vectorize``): |sum of s| per weight vector, i.e. per row (an output
  channel) or column (an input channel) of one linear, and these are summed over the linears of the
  dependency group (and over a head's head_dim rows/columns, as their consecutive-group reduction does).
  So it is *not* |sum over the whole group|: signs cancel inside a vector, not across vectors.

Units: an FFN channel = gate row + up row + down column; a query head = its q rows + o columns (with
GQA the k/v rows are shared by the group and belong to no single query head; with group size 1 the
head's own k/v rows are included, as in LLM-Pruner's Llama-1 setting).

Gradients are computed once on the dense model, before pruning (``collect_gradients``); the pipeline
hands each block's dict to the criterion as ``BlockStats.grads``.
"""

from __future__ import annotations

import torch

from daprune.backward import frozen_for_gradients, next_token_backward
from daprune.criteria.base import Criterion, register
from daprune.errors import ConfigError
from daprune.models.adapter import BlockAdapter, ModelAdapter
from daprune.stats import BlockStats

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def block_linears(block: BlockAdapter) -> dict[str, torch.nn.Linear]:
    """The block's linears by role; a plain FFN's one level-1 linear is "up" (it has no gate)."""
    q, k, v = block.attn_in()
    level1 = dict(zip(("gate", "up") if block.gated else ("up",), block.ffn_in(), strict=True))
    return {"q": q, "k": k, "v": v, "o": block.attn_out(), **level1, "down": block.ffn_out()}


def collect_gradients(model: torch.nn.Module, adapter: ModelAdapter, ids: torch.Tensor, batch_size: int = 8,
                      progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """fp32 gradients of the mean next-token NLL over ``ids`` [n, seqlen] w.r.t. every block linear's weight.

    Batches are weighted so the sum is the gradient of the mean over all windows. Only the block linears
    get ``requires_grad`` (no gradient buffers for embeddings / norms); every parameter's flag is restored
    and ``.grad`` cleared afterwards, so the model leaves exactly as it came.
    """
    blocks = [adapter.block(i) for i in range(adapter.n_layers)]
    for b in blocks:  # fused / transposed weights as the plain linears the pipeline will score
        b.to_canonical()
    linears = {(b.index, r): lin for b in blocks for r, lin in block_linears(b).items()}
    acc = {key: torch.zeros(lin.weight.shape, dtype=torch.float32) for key, lin in linears.items()}

    def accumulate() -> None:
        for key, lin in linears.items():
            acc[key] += lin.weight.grad.float().cpu()
            lin.weight.grad = None

    n, seqlen = ids.shape
    with frozen_for_gradients(model):  # flags restored by name after to_native: fused modules are rebuilt
        try:
            for lin in linears.values():
                lin.weight.requires_grad_(True)
            next_token_backward(model, ids, batch_size, divide_by=n * (seqlen - 1), after_batch=accumulate,
                                progress=progress)
        finally:
            for lin in linears.values():
                lin.weight.grad = None
            for b in blocks:
                b.to_native()
    out: dict[int, dict[str, torch.Tensor]] = {}
    for (i, r), g in acc.items():
        out.setdefault(i, {})[r] = g
    return out


class _Taylor(Criterion):
    """Shared unit bookkeeping; ``reduce(s, dim)`` turns a salience matrix into one value per vector."""

    needs = frozenset({"grads"})

    def reduce(self, s: torch.Tensor, dim: int) -> torch.Tensor:
        """One value per row (dim=1) or column (dim=0) of a salience matrix."""
        raise NotImplementedError

    def _salience(self, block: BlockAdapter, stats: BlockStats, role: str) -> torch.Tensor:
        if role not in stats.grads:
            raise ConfigError(f"criterion {self.name!r} needs gradients (block {block.index} has none for {role}); "
                              "they come from daprune.criteria.taylor.collect_gradients, which the uniform "
                              "schedule's API call runs (not available to the adaptive schedule)")
        w = block_linears(block)[role].weight.float()
        g = stats.grads[role].to(w.device, torch.float32)
        if g.shape != w.shape:
            raise ConfigError(f"block {block.index} {role}: gradient shape {tuple(g.shape)} does not match the "
                              f"weight {tuple(w.shape)} (was the block sliced before scoring?)")
        return w * g

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        level1 = ("gate", "up") if block.gated else ("up",)
        rows = sum(self.reduce(self._salience(block, stats, role), 1) for role in level1)
        return rows + self.reduce(self._salience(block, stats, "down"), 0)

    def head_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        h, hd = block.n_heads, block.head_dim
        roles = ("q", "k", "v") if block.group_size == 1 else ("q",)  # rows this head owns
        per_row = sum(self.reduce(self._salience(block, stats, role), 1) for role in roles)
        per_row = per_row + self.reduce(self._salience(block, stats, "o"), 0)
        return per_row.view(h, hd).sum(1)


@register
class TaylorE1(_Taylor):
    name = "taylor-e1"

    def reduce(self, s: torch.Tensor, dim: int) -> torch.Tensor:
        return s.abs().sum(dim)


@register
class TaylorVector(_Taylor):
    name = "taylor-vector"

    def reduce(self, s: torch.Tensor, dim: int) -> torch.Tensor:
        return s.sum(dim).abs()
