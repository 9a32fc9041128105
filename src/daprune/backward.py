"""One gradient pass of the whole model over calibration rows, and leaving the model as it came.

LLM-Pruner's Taylor scores (:func:`daprune.criteria.taylor.collect_gradients`) and ``--error-weight fisher``
(:func:`daprune.fisher.output_fisher`) both differentiate the next-token NLL over the calibration windows; they
differ only in which tensors need a gradient and what they read off each batch, so the pass and the bookkeeping
around it live here once, as does its block-by-block form for a model that is streamed one block at a time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

if TYPE_CHECKING:
    from daprune.models.adapter import BlockAdapter, ModelAdapter
    from daprune.stores import ResidentStore


def summed_next_token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The next-token NLL of ``ids`` [b, seqlen] under ``logits`` [b, seqlen, vocab], summed over tokens (fp32)."""
    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                           reduction="sum")


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
            loss = summed_next_token_nll(logits, batch) / divide_by
            loss.backward()
            if after_batch is not None:
                after_batch()


@contextmanager
def gradients_of(params: list[torch.nn.Parameter]) -> Iterator[None]:
    """Inside: ``params`` require a gradient. On exit each one's own ``requires_grad`` is back and ``.grad`` cleared,
    so a pass that differentiates a few weights leaves the model's flags as it found them."""
    saved = [p.requires_grad for p in params]
    try:
        for p in params:
            p.requires_grad_(True)
        yield
    finally:
        for p, flag in zip(params, saved, strict=True):
            p.requires_grad_(flag)
            p.grad = None


def blockwise_next_token_backward(adapter: ModelAdapter, store: ResidentStore, ids: torch.Tensor, batch_size: int, *,
                                  watch: Callable[[BlockAdapter], list] | None = None,
                                  weights: Callable[[BlockAdapter], list[torch.nn.Parameter]] | None = None,
                                  take_weight_grads: Callable[[BlockAdapter, list[torch.Tensor]], None] | None = None,
                                  divide_by: float = 1.0, desc: str = "gradients", progress: bool = True) -> None:
    """The backward of the summed next-token NLL over ``ids`` divided by ``divide_by``, through a block store, one
    block in memory at a time (``--streaming``); ``watch(block)`` registers what reads each block's gradients and
    returns its hooks; ``weights(block)`` names parameters of the block whose gradient is wanted, summed over the
    batches in fp32 and handed once per block, before it is released, to ``take_weight_grads(block, sums)`` (one
    tensor per parameter, in that order, on the block's device).

    A block's gradients need the gradient arriving at its output, which needs every later block. So: one forward
    of the stream keeping each block's input (in the store's activation storage: memory or files), the loss's
    gradient at the last block's output from the LM head, then from the last block down, each block loaded once
    more, its forward recomputed from its kept input and differentiated with the gradient from above (what
    gradient checkpointing does), which gives the gradient handed to the block below and, in the same
    ``autograd.grad`` call, the gradients of the named weights (they require a gradient only during their block's
    pass: their flags are restored before the block is released). Costs one more block forward than the
    whole-model pass and holds every block's input at once (n_layers streams: ``--activations disk`` puts them in
    files). Without ``weights`` only the blocks' inputs are differentiated: no weight gradient is formed.
    """
    if (weights is None) != (take_weight_grads is None):
        raise ValueError("weights and take_weight_grads come together")
    acts, bs = store.acts, batch_size
    n_layers, dev = adapter.n_layers, acts.exec_device
    ctxs = store.layer_inputs(ids.shape[1])
    x = store.embed(ids, bs)
    inputs = []
    with torch.no_grad():
        for i in tqdm(range(n_layers), desc=f"{desc}: forward", disable=not progress):
            block = store.load(i)
            inputs.append(x)
            x = acts.forward(block, x, ctxs[i], bs, f"backward-in{i + 1}")
            store.release(i)
    grad = acts.empty("backward-grad", tuple(x.shape), torch.float32)
    with store.outside_layers(head=True), torch.enable_grad():
        # one row at a time: the logits and their gradient are seqlen x vocab floats (Gemma's 262k vocabulary:
        # a batch of 8 x 128 tokens is 1 GB of logits, several with the loss's copies), the block inputs are not
        for s in range(ids.shape[0]):
            h = x[s : s + 1].to(dev).detach().requires_grad_()
            logits = adapter.logits(h)
            loss = summed_next_token_nll(logits, ids[s : s + 1].to(dev)) / divide_by
            grad[s : s + 1].copy_(torch.autograd.grad(loss, h)[0])
    acts.drop(x)
    for i in tqdm(reversed(range(n_layers)), total=n_layers, desc=f"{desc}: backward", disable=not progress):
        block = store.load(i)
        hooks = watch(block) if watch is not None else []
        params = weights(block) if weights is not None else []
        below = acts.empty(f"backward-grad{i}", tuple(grad.shape), torch.float32) if i else None
        sums: list[torch.Tensor] = []
        try:
            with gradients_of(params), torch.enable_grad():
                for s in range(0, ids.shape[0], bs):
                    xi = inputs[i][s : s + bs].to(dev).detach().requires_grad_()
                    y = block.forward(xi, ctxs[i])
                    g, *gw = torch.autograd.grad(y, [xi, *params], grad_outputs=grad[s : s + bs].to(y.device, y.dtype))
                    if below is not None:
                        below[s : s + bs].copy_(g)
                    if sums:
                        for acc, gi in zip(sums, gw, strict=True):
                            acc += gi
                    else:
                        sums = [gi.detach().float() for gi in gw]
            if params:
                take_weight_grads(block, sums)
        finally:
            for hk in hooks:
                hk.remove()
            store.release(i)
        acts.drop(grad)
        acts.drop(inputs[i])  # block 0's input too: the pipeline embeds again under the same name
        grad = below
