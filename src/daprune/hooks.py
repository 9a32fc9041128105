"""Forward hooks that record module inputs/outputs for one forward call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def capture(modules: dict[str, nn.Module]) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(input, output)`` of each named module during the forward calls inside the block."""
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, mod in modules.items():
        def hook(_m, args, out, _name=name):
            seen[_name] = (args[0].detach(), out.detach())

        handles.append(mod.register_forward_hook(hook))
    try:
        yield seen
    finally:
        for h in handles:
            h.remove()
