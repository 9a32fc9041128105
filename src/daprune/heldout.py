"""Held-out rows kept whole, so that a re-fit can be judged on the real block output rather than a linearisation.

``--recovery heldout`` chooses each re-fit's strength by its error on calibration rows no statistic saw. Where the
fitted target is the linear's own output, or the block output reached through a plain residual add, that error
follows from second moments exactly. Through a norm after the FFN (Gemma-2/3) the block target is a Gauss-Newton
step (:func:`daprune.recovery.block_target_step`) and its least-squares error is only an estimate: a re-fit can
lower it and still move the block output away from the dense one. These rows let the choice run the candidate
weights through the family's own output map (:meth:`BlockAdapter.ffn_output_delta`) instead.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from daprune.models.adapter import BlockAdapter


class HeldoutOutputs:
    """The held-out rows' level-2 FFN input and output, block output and dense block output, flattened to rows."""

    def __init__(self) -> None:
        self.parts: dict[str, list[torch.Tensor]] = {"x": [], "o": [], "y": [], "yd": []}

    def add(self, x: torch.Tensor, o: torch.Tensor, y: torch.Tensor, yd: torch.Tensor) -> None:
        for name, t in (("x", x), ("o", o), ("y", y), ("yd", yd)):
            self.parts[name].append(t.detach().float().reshape(-1, t.shape[-1]))

    def judge(self, block: BlockAdapter, cols: torch.Tensor) -> Callable[[torch.Tensor], float] | None:
        """E||block output - dense block output||^2 on the held-out rows once the level-2 FFN linear's weights over
        its input columns ``cols`` are ``w`` ([out, len(cols)], a bias as one more column); None without rows."""
        if not self.parts["x"]:
            return None
        x, o, y, yd = (torch.cat(self.parts[n]) for n in ("x", "o", "y", "yd"))
        x = x[:, cols.to(x.device)]
        with torch.no_grad():  # the block output without its FFN output: formed once, not once per candidate
            rest = y + block.ffn_output_delta(o, torch.zeros_like(o)).float()

        def error(w: torch.Tensor) -> float:
            w = w.to(x.device, torch.float32)
            o_new = x @ w[:, : x.shape[1]].T
            if w.shape[1] > x.shape[1]:
                o_new = o_new + w[:, -1]
            with torch.no_grad():
                moved = rest + block.ffn_output_delta(torch.zeros_like(o_new), o_new).float()
            return float((moved - yd).double().pow(2).sum(-1).mean())

        return error
