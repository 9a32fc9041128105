"""One gradient pass of the whole model over calibration rows, and leaving the model as it came.

LLM-Pruner's Taylor scores (:func:`daprune.criteria.taylor.collect_gradients`) and ``--error-weight fisher``
(:func:`daprune.fisher.output_fisher`) both differentiate the next-token NLL over the calibration windows; they
differ only in which tensors need a gradient and what they read off each batch, so the pass and the bookkeeping
around it live here once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


@contextmanager
def frozen_for_gradients(model: torch.nn.Module) -> Iterator[None]:
    """Inside: eval mode, no parameter requires a gradient, none holds one (the caller enables what it needs).
    On exit every parameter's ``requires_grad`` is restored by name (modules rebuilt in between, e.g. fused
    weights split and joined again, get their flags back), ``.grad`` cleared, and the training mode restored."""
    saved = {name: p.requires_grad for name, p in model.named_parameters()}
    was_training = model.training
    model.eval()
    try:
        for p in model.parameters():
            p.requires_grad_(False)
            p.grad = None
        yield
    finally:
        for name, p in model.named_parameters():
            p.requires_grad_(saved.get(name, p.requires_grad))
            p.grad = None
        model.train(was_training)


def next_token_backward(model: torch.nn.Module, ids: torch.Tensor, batch_size: int, *, divide_by: float = 1.0,
                        after_batch: Callable[[], None] | None = None, desc: str = "gradients",
                        progress: bool = True) -> None:
    """Backward of the summed next-token NLL over ``ids`` [n, seqlen] divided by ``divide_by``, batch by batch
    (summed, so a token counts the same in every batch size); ``after_batch`` reads what the batch left behind."""
    dev = next(model.parameters()).device
    with torch.enable_grad():
        for s in tqdm(range(0, ids.shape[0], batch_size), desc=desc, disable=not progress):
            batch = ids[s : s + batch_size].to(dev)
            logits = model(input_ids=batch, use_cache=False).logits
            loss = F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                   reduction="sum") / divide_by
            loss.backward()
            if after_batch is not None:
                after_batch()
