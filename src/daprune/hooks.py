"""Forward hooks that record module inputs/outputs for one forward call."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class _AllSeen(Exception):
    """Raised from the last hook of ``capture(..., stop=True)`` to end the forward call early."""


@contextmanager
def capture(modules: dict[str, nn.Module], stop: bool = False
            ) -> Iterator[dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """Record ``(input, output)`` of each named module during the forward calls inside the block.

    ``stop``: once every named module has run, end the forward call there (the exception is swallowed here), so a
    caller that wants only these modules' inputs and outputs does not pay for the rest of the block. A statistics
    pass for the q/k/v re-fit then costs a norm and three projections instead of a whole block, on both streams.
    The forward's return value is then never produced: only use it where the caller does not read it, and only
    on modules that run once per forward (the records would otherwise hold the first call, not the last).
    """
    seen: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    handles = []
    for name, mod in modules.items():
        def hook(_m, args, out, _name=name):
            seen[_name] = (args[0].detach(), out.detach())
            if stop and len(seen) == len(modules):
                raise _AllSeen

        handles.append(mod.register_forward_hook(hook))
    try:
        yield seen
    except _AllSeen:
        pass
    finally:
        for h in handles:
            h.remove()
