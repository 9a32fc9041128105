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

Gradients are computed once on the dense model, before pruning: by one backward of the whole model
(``collect_gradients``), or block by block through a store (``streamed_gradients``, ``--streaming``: the same
gradients, one block in memory at a time, each block's handed over as soon as it is done so the run can keep
them in files). The pipeline hands each block's dict to the criterion as ``BlockStats.grads``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from daprune.backward import blockwise_next_token_backward, frozen_for_gradients, gradients_of, next_token_backward
from daprune.criteria.base import Criterion, register
from daprune.errors import ConfigError
from daprune.models.adapter import BlockAdapter, ModelAdapter
from daprune.stats import BlockStats

if TYPE_CHECKING:
    from daprune.stores import ResidentStore

ROLES = ("q", "k", "v", "o", "gate", "up", "down")


def block_linears(block: BlockAdapter) -> dict[str, torch.nn.Linear]:
    """The block's linears by role; a plain FFN's one level-1 linear is "up" (it has no gate)."""
    q, k, v = block.attn_in()
    level1 = dict(zip(("gate", "up") if block.gated else ("up",), block.ffn_in(), strict=True))
    return {"q": q, "k": k, "v": v, "o": block.attn_out(), **level1, "down": block.ffn_out()}


def linear_weights(block: BlockAdapter) -> list[torch.nn.Parameter]:
    """The weights whose gradients the Taylor scores read, in :func:`block_linears`' role order."""
    return [lin.weight for lin in block_linears(block).values()]


def collect_gradients(model: torch.nn.Module, adapter: ModelAdapter, ids: torch.Tensor, batch_size: int = 8,
                      progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """fp32 gradients of the mean next-token NLL over ``ids`` [n, seqlen] w.r.t. every block linear's weight.

    Batches are weighted so the sum is the gradient of the mean over all windows. Only the block linears
    get ``requires_grad`` (no gradient buffers for embeddings / norms); every parameter's flag is restored
    and ``.grad`` cleared afterwards, so the model leaves exactly as it came.
    """
    blocks = [adapter.block(i) for i in range(adapter.n_layers)]
    sums: dict[int, dict[str, torch.Tensor]] = {}

    def accumulate() -> None:  # each batch's gradients into fp32 sums on the CPU, and .grad cleared for the next
        for b in blocks:
            acc = sums.setdefault(b.index, {})
            for role, lin in block_linears(b).items():
                g = lin.weight.grad.detach().float().cpu()
                if role in acc:
                    acc[role] += g
                else:  # a copy: later batches are added in place, and this may be the .grad tensor itself
                    acc[role] = g.clone()
                lin.weight.grad = None

    n, seqlen = ids.shape
    # flags saved by their native names and restored after to_native (fused modules are rebuilt in between)
    with frozen_for_gradients(model):
        for b in blocks:  # fused / transposed weights as the plain linears the pipeline will score
            b.to_canonical()
        try:
            with gradients_of([w for b in blocks for w in linear_weights(b)]):
                next_token_backward(model, ids, batch_size, divide_by=n * (seqlen - 1), after_batch=accumulate,
                                    progress=progress)
        finally:
            for b in blocks:
                b.to_native()
    return sums


def streamed_gradients(adapter: ModelAdapter, store: ResidentStore, ids: torch.Tensor,
                       take: Callable[[int, dict[str, torch.Tensor]], None], batch_size: int = 8,
                       progress: bool = True) -> None:
    """:func:`collect_gradients` through a block store, one block in memory at a time (``--streaming``).

    The same fp32 gradients of the mean next-token NLL (roles and canonical form as there; the store hands out
    canonical blocks), from :func:`daprune.backward.blockwise_next_token_backward`. Each block's dict goes to
    ``take(index, grads)`` as soon as its pass is over (last block first), so the caller can write it to disk
    instead of holding every block's gradients, which are as large as the model in fp32.
    """
    def hand_over(block: BlockAdapter, sums: list[torch.Tensor]) -> None:
        take(block.index, {role: g.cpu() for role, g in zip(block_linears(block), sums, strict=True)})

    n, seqlen = ids.shape
    blockwise_next_token_backward(adapter, store, ids, batch_size, weights=linear_weights, take_weight_grads=hand_over,
                                  divide_by=n * (seqlen - 1), desc="gradients", progress=progress)


class _Taylor(Criterion):
    """Shared unit bookkeeping; ``reduce(s, dim)`` turns a salience matrix into one value per vector."""

    needs = frozenset({"grads"})

    def reduce(self, s: torch.Tensor, dim: int) -> torch.Tensor:
        """One value per row (dim=1) or column (dim=0) of a salience matrix."""
        raise NotImplementedError

    def _salience(self, block: BlockAdapter, stats: BlockStats, role: str) -> torch.Tensor:
        if role not in stats.grads:
            raise ConfigError(f"criterion {self.name!r} needs gradients (block {block.index} has none for {role}); "
                              "they come from daprune.criteria.taylor.collect_gradients or streamed_gradients, "
                              "which the uniform schedule's API call runs (not available to the adaptive schedule)")
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
