"""The pruned block's output from the statistics pass, without running the block again.

Why: the last statistics pass of a block runs it over the whole pruned stream with its heads already cut
and every FFN channel still there; only the FFN's level-2 linear (down_proj / fc2) and its input columns
change after that (channel slicing, OBS compensation, re-fits, FLAP's bias). So the block's new output is
its output in that pass plus the change of the FFN's contribution, which the family's adapter maps to the
residual stream (:meth:`daprune.models.adapter.BlockAdapter.ffn_output_delta`). That replaces one whole block
forward per pruned block (attention included) with one narrower level-2 matmul, and is the same arithmetic
up to float rounding (tests/test_replay.py compares it with the block's own forward on every family).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from daprune.models.adapter import BlockAdapter

# the pass keeps the block output, the level-2 input and its output of every row: above this, re-run the block
REPLAY_MAX_BYTES = 1 << 30


def replay_bytes(rows: int, seqlen: int, hidden: int, channels: int, dtype: torch.dtype) -> int:
    """Memory a replay of ``rows`` stream rows holds (block output + level-2 output + level-2 input)."""
    return rows * seqlen * (2 * hidden + channels) * dtype.itemsize


class FFNReplay:
    """Per batch of the last statistics pass: the block's output, the level-2 linear's input and output; and
    that linear's weights as they were in the pass."""

    def __init__(self) -> None:
        self.batches: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        self.weight: torch.Tensor | None = None
        self.bias: torch.Tensor | None = None

    def add(self, y: torch.Tensor, x_down: torch.Tensor, o_down: torch.Tensor) -> None:
        self.batches.append((y, x_down, o_down))

    def snapshot(self, lin: nn.Linear) -> None:
        """The level-2 linear as the pass ran it (called once the pass is over)."""
        self.weight = lin.weight.detach().clone()
        self.bias = None if lin.bias is None else lin.bias.detach().clone()

    @torch.no_grad()
    def output(self, block: BlockAdapter, keep: torch.Tensor | None) -> torch.Tensor | None:
        """The block's output now, on the rows of the pass; ``keep``: the FFN channels kept since (None: all).

        The level-2 output changes by minus the removed channels' contribution, plus the kept columns' change
        where a compensation or re-fit moved them, plus any bias change: with plain removal that is a matmul
        over the removed channels only. None when the family cannot say how its FFN output reaches the
        residual stream.
        """
        assert self.weight is not None, "snapshot() the pass's level-2 linear first"
        lin = block.ffn_out()
        n = self.weight.shape[1]
        keep = torch.arange(n) if keep is None else keep.cpu()
        dropped = torch.ones(n, dtype=torch.bool)
        dropped[keep] = False
        removed = dropped.nonzero().flatten()
        dev = self.weight.device
        keep, removed = keep.to(dev), removed.to(dev)
        w_removed = self.weight.index_select(1, removed)
        w_change = lin.weight.detach() - self.weight.index_select(1, keep)
        moved = bool(w_change.any())
        b_change = _bias(lin.bias, lin.weight) - _bias(self.bias, self.weight)
        out = []
        for y, x, o in self.batches:
            d = b_change - F.linear(x.index_select(-1, removed), w_removed)
            if moved:
                d = d + F.linear(x.index_select(-1, keep), w_change)
            delta = block.ffn_output_delta(o, o + d)
            if delta is None:
                return None
            out.append(y + delta.view_as(y))  # OPT runs its FFN on [batch * seq, hidden]
        return torch.cat(out) if out else None


def _bias(b: torch.Tensor | None, w: torch.Tensor) -> torch.Tensor:
    return torch.zeros(w.shape[0], dtype=w.dtype, device=w.device) if b is None else b.detach()
