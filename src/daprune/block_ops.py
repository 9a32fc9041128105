"""Operations on one decoder block that the pipeline, the global schedules (sensitivity, OWL, the uniform layout)
and the allocation search share: running it over stream rows, copying it, naming the linears behind a statistic
role, and the least-squares compensation of kept columns (OBS's closed form)."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from daprune.models.adapter import BlockAdapter, ModelAdapter


def as_rows(got: dict[str, tuple[torch.Tensor, ...]], rows: int) -> dict[str, tuple[torch.Tensor, ...]]:
    """Captured linear inputs / outputs as [rows, seq, features]. OPT runs its FFN on [rows * seq, features]; the
    statistics slice scoring rows (``x[:k]``) and scale tokens (``--token-weight``) by row, which on the flat form
    would take the first k *tokens* instead."""
    return {name: tuple(t.reshape(rows, -1, t.shape[-1]) if t.dim() == 2 else t for t in pair)
            for name, pair in got.items()}


def role_linears(block: BlockAdapter, role: str) -> list:
    """The linears whose (shared) input a statistic role describes; the first one is hooked."""
    if role == "attn_in":
        return block.attn_in()
    if role == "o_in":
        return [block.attn_out()]
    if role == "ffn_in":
        return block.ffn_in()
    return [block.ffn_out()]


def compensate(d: torch.Tensor, second: torch.Tensor, keep: list[int], damp: float) -> torch.Tensor:
    """``d`` with the kept columns least-squares compensated for the removed ones, the rest zero (what OBS with the
    damped Hessian S + lambda I ends with): W_K = D_K + D_R S_RK (S_KK + lambda I)^-1, lambda = damp * mean(diag S)
    as in obs_order. This is the ridge toward the original columns, so a strong damping leaves them as they were
    (a ridge toward zero would shrink them)."""
    s = second.double()
    keep_mask = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
    keep_mask[torch.tensor(keep, dtype=torch.long, device=s.device)] = True
    k, r = keep_mask.nonzero().flatten(), (~keep_mask).nonzero().flatten()
    lam = damp * torch.diagonal(s).mean().clamp_min(1e-12)
    skk = s[k][:, k] + lam * torch.eye(len(k), dtype=s.dtype, device=s.device)
    dd = d.double()
    w = torch.zeros_like(dd)
    w[:, k] = dd[:, k] + torch.linalg.solve(skk, (dd[:, r] @ s[r][:, k]).T).T
    return w.float()


def forward_rows(block: BlockAdapter, x: torch.Tensor, ctx: dict, bs: int) -> torch.Tensor:
    """``block`` over the rows of ``x`` in batches of ``bs`` (the batches a prune runs, so results match it)."""
    return torch.cat([block.forward(x[s : s + bs], ctx) for s in range(0, x.shape[0], bs)])


def copy_block(block: BlockAdapter) -> BlockAdapter:
    """An independent copy of a block (the dense reference while the original is being pruned)."""
    return type(block)(copy.deepcopy(block.layer), block.index)


def canonical(adapter: ModelAdapter, index: int) -> BlockAdapter:
    """Block ``index`` in canonical form (fused/transposed weights as plain linears), for accounting."""
    block = adapter.block(index)
    block.to_canonical()
    return block


def read_canonical(adapter: ModelAdapter, index: int, read):
    """``read(block)`` on block ``index`` in canonical form (native fused or Conv1D weights have no plain linears
    to read widths from), the block put back in native form afterwards."""
    block = canonical(adapter, index)
    try:
        return read(block)
    finally:
        block.to_native()
