"""What the model itself passes to each decoder layer, captured instead of rebuilt.

Why: every family prepares its layers' inputs differently (causal vs sliding-window masks per layer,
one rotary table or one per layer type, learned positions added before the first layer, embedding
scaling). Rebuilding any of that in an adapter means re-implementing the family. Instead the model's
own forward runs with each layer's ``forward`` temporarily replaced by a recorder, which stores the
arguments the model passed and hands the hidden states on unchanged; after the last layer a private
exception stops the run, so the final norm and LM head (meta tensors while streaming) never run.

Masks are captured under the eager attention implementation: other implementations may pass no mask
at all and rely on ``is_causal`` inside the kernel, which a layer run alone (or with eager attention,
to read attention probabilities) could not know. An explicit mask gives every kernel the same result.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch
from torch import nn


class _Stop(Exception):
    """Raised by the last recorder: the rest of the model's forward is not needed."""


@contextlib.contextmanager
def attention_implementation(config, name: str) -> Iterator[None]:
    """Temporarily run attention (and mask creation) with implementation ``name`` ("eager", "sdpa")."""
    old = getattr(config, "_attn_implementation", None)
    if old == name:
        yield
        return
    config._attn_implementation = name
    try:
        yield
    finally:
        config._attn_implementation = old


@torch.no_grad()
def capture_layer_inputs(model: nn.Module, layers: Sequence[nn.Module], input_ids: torch.Tensor,
                         upto: int | None = None) -> tuple[torch.Tensor, list[dict]]:
    """Run ``model`` on ``input_ids`` up to layer ``upto`` (default: all) without running any layer.

    Returns the hidden states that reach the first layer (embedding, scaling, learned positions: whatever
    the model does before its layers) and, per recorded layer, the keyword arguments the model passed
    it (attention mask, position embeddings, position ids, ...), with caching turned off.
    """
    last = len(layers) - 1 if upto is None else upto
    seen: list[dict] = []
    first: list[torch.Tensor] = []

    def recorder(index: int):
        def forward(hidden_states, *args, **kwargs):
            if args:  # a family passing more positional arguments: keep them by position
                kwargs = {**kwargs, "__args__": args}
            if index == 0:
                first.append(hidden_states)
            seen.append(kwargs)
            if index == last:
                raise _Stop
            return hidden_states

        return forward

    patched = list(layers)[: last + 1]
    for i, layer in enumerate(patched):
        layer.forward = recorder(i)
    try:
        with attention_implementation(model.config, "eager"):
            model(input_ids=input_ids, use_cache=False)
    except _Stop:
        pass
    finally:
        for layer in patched:
            del layer.forward  # back to the class's forward
    if len(seen) != last + 1:
        raise RuntimeError(f"the model called {len(seen)} of its first {last + 1} layers")  # pragma: no cover
    return first[0], seen


def layer_call(layer: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    """Call a decoder layer with the arguments the model gave it; the hidden states it returns."""
    args = kwargs.get("__args__", ())
    rest = {k: v for k, v in kwargs.items() if k != "__args__"}
    out = layer(hidden, *args, **rest)
    return out[0] if isinstance(out, tuple) else out
