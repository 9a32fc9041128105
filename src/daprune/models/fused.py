"""Fused and transposed projections presented as plain ``nn.Linear``s, and converted back.

Why: the pruning algorithm slices rows and columns of ``nn.Linear`` weights ``[out, in]``. Some families
store several projections in one matrix (Phi-3's ``qkv_proj`` / ``gate_up_proj``, GPT-NeoX's per-head
interleaved ``query_key_value``) or use GPT-2's ``Conv1D`` (weight ``[in, out]``). :class:`FusedLinear`
holds one plain Linear per part and assembles their outputs in the native layout, so the family's own
forward (which splits the fused output) runs unchanged; :class:`Conv1DLinear` computes exactly as Conv1D.
``to_linear`` / ``to_conv1d`` / :func:`conv1d_from_linear` rebuild the family's own modules, so saved
tensors keep their names and layouts.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D


def _conv1d_addmm(x: torch.Tensor, weight_in_out: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """What ``Conv1D`` computes (addmm with an ``[in, out]`` matrix), so results match it exactly."""
    x2 = x.reshape(-1, x.shape[-1])
    y = x2 @ weight_in_out if bias is None else torch.addmm(bias, x2, weight_in_out)
    return y.view(*x.shape[:-1], weight_in_out.shape[1])


def _linear(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool,
            cls: type[nn.Linear] = nn.Linear) -> nn.Linear:
    """A Linear (or subclass) holding copies of ``weight`` ``[out, in]`` and ``bias``, same dtype and device."""
    lin = cls(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    lin.weight = nn.Parameter(weight.detach().clone().contiguous(), requires_grad=requires_grad)
    if bias is not None:
        lin.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=requires_grad)
    return lin


class Conv1DLinear(nn.Linear):
    """A GPT-2 ``Conv1D`` as an ``nn.Linear`` (weight ``[out, in]``) that computes exactly as the Conv1D did.

    Plain ``F.linear`` multiplies by the transposed matrix, which can differ from Conv1D in the last bit;
    multiplying by an ``[in, out]`` copy keeps the model's outputs identical in canonical form.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _conv1d_addmm(x, self.weight.t().contiguous(), self.bias)


def linear_from_conv1d(conv: nn.Module) -> Conv1DLinear:
    """A :class:`Conv1DLinear` with the values of ``conv`` (a transformers ``Conv1D``)."""
    bias = getattr(conv, "bias", None)
    return _linear(conv.weight.t(), bias, conv.weight.requires_grad, Conv1DLinear)


def conv1d_from_weights(weight: torch.Tensor, bias: torch.Tensor | None, requires_grad: bool) -> Conv1D:
    """A transformers ``Conv1D`` holding ``weight`` given as ``[out, in]`` (stored transposed, as Conv1D does)."""
    out_features, in_features = weight.shape
    with torch.device("meta"):  # no throw-away allocation and random init: both tensors are replaced
        conv = Conv1D(out_features, in_features)
    conv.weight = nn.Parameter(weight.detach().t().contiguous(), requires_grad=requires_grad)
    if bias is None:
        bias = weight.new_zeros(out_features)
    conv.bias = nn.Parameter(bias.detach().clone().contiguous(), requires_grad=requires_grad)
    return conv


def conv1d_from_linear(lin: nn.Linear) -> Conv1D:
    return conv1d_from_weights(lin.weight, lin.bias, lin.weight.requires_grad)


class FusedLinear(nn.Module):
    """Named plain Linears (``q, k, v`` or ``gate, up``) standing in for one fused projection.

    The output is the fused projection's, in its native row order: the parts one after another, or, with
    ``interleave=head_dim`` (GPT-NeoX), head by head (``[head, part, head_dim]`` rows; all parts have the
    same width). Each part is called as a module, so forward hooks on a part (the pipeline records the
    inputs of ``attn_in()[0]`` / ``ffn_in()[0]``) fire as they would on a separate projection; slicing a
    part changes the output layout exactly as the family's forward expects (it splits by widths it reads
    from module attributes, kept in step by the block's ``layout_attributes``).
    """

    def __init__(self, parts: dict[str, nn.Linear], *, interleave: int | None = None):
        super().__init__()
        self.names = tuple(parts)
        for name, lin in parts.items():
            self.add_module(name, lin)
        self.interleave = interleave

    def parts(self) -> list[nn.Linear]:
        return [getattr(self, n) for n in self.names]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        outs = [p(x) for p in self.parts()]
        if self.interleave is None:
            return torch.cat(outs, -1)
        # [..., heads * hd] per part -> [..., heads, part, hd] -> the native [..., heads * parts * hd]
        return torch.stack([o.unflatten(-1, (-1, self.interleave)) for o in outs], -2).flatten(-3)

    def _fuse(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        if self.interleave is None:
            return torch.cat(tensors, 0)
        return torch.stack([t.unflatten(0, (-1, self.interleave)) for t in tensors], 1).flatten(0, 2)

    def fused_weight(self) -> torch.Tensor:
        """The fused weight ``[out, in]`` in the family's row order."""
        return self._fuse([p.weight for p in self.parts()])

    def fused_bias(self) -> torch.Tensor | None:
        if all(p.bias is None for p in self.parts()):
            return None
        return self._fuse([p.weight.new_zeros(p.out_features) if p.bias is None else p.bias for p in self.parts()])

    @classmethod
    def split(cls, weight: torch.Tensor, bias: torch.Tensor | None, sizes: dict[str, int], *,
              requires_grad: bool, interleave: int | None = None,
              part_cls: type[nn.Linear] = nn.Linear) -> FusedLinear:
        """Cut a fused ``[out, in]`` weight (and bias) into parts of ``sizes`` rows (native row order)."""
        names, n = list(sizes), len(sizes)
        if interleave is None:
            ws = list(weight.split(list(sizes.values()), 0))
            bs = list(bias.split(list(sizes.values()), 0)) if bias is not None else [None] * n
        else:  # rows [head, part, hd]: part j of every head
            ws = [w.flatten(0, 1) for w in weight.unflatten(0, (-1, n, interleave)).unbind(1)]
            bs = [b.flatten() for b in bias.unflatten(0, (-1, n, interleave)).unbind(1)] if bias is not None \
                else [None] * n
        parts = {name: _linear(w, b, requires_grad, part_cls) for name, w, b in zip(names, ws, bs, strict=True)}
        return cls(parts, interleave=interleave)

    @classmethod
    def from_linear(cls, lin: nn.Linear, sizes: dict[str, int], interleave: int | None = None) -> FusedLinear:
        return cls.split(lin.weight, lin.bias, sizes, requires_grad=lin.weight.requires_grad, interleave=interleave)

    @classmethod
    def from_conv1d(cls, conv: nn.Module, sizes: dict[str, int]) -> FusedLinear:
        """Parts that each compute as the Conv1D did (:class:`Conv1DLinear`)."""
        return cls.split(conv.weight.t(), conv.bias, sizes, requires_grad=conv.weight.requires_grad,
                         part_cls=Conv1DLinear)

    def to_linear(self) -> nn.Linear:
        return _linear(self.fused_weight(), self.fused_bias(), self.parts()[0].weight.requires_grad)

    def to_conv1d(self) -> Conv1D:
        return conv1d_from_weights(self.fused_weight(), self.fused_bias(), self.parts()[0].weight.requires_grad)


def equal_split(total: int, names: Sequence[str]) -> dict[str, int]:
    """Sizes for ``len(names)`` parts of equal width (GPT-2's q/k/v, Phi-3's gate/up)."""
    if total % len(names):
        raise ValueError(f"a fused width of {total} does not split into {len(names)} equal parts")
    return dict.fromkeys(names, total // len(names))
