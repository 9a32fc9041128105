"""GPT-2 decoders: pre-LayerNorm blocks, learned positions, multi-head attention, plain FFN, all ``Conv1D``.

``Conv1D`` stores its weight transposed (``[in, out]``) and ``attn.c_attn`` fuses q, k, v. In canonical
form the four projections are :class:`Conv1DLinear` / :class:`FusedLinear` (computing exactly as Conv1D);
``to_native`` rebuilds Conv1Ds with GPT-2's parameter names and layout. The attention forward splits the
fused output by ``attn.split_size`` (query width) and views heads by ``head_dim``, so only the split size
(and, for reference, ``num_heads``) follow the block's shape. Cross-attention blocks are not supported.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from daprune.errors import UnsupportedModelError
from daprune.models.adapter import BlockAdapter, ModelAdapter, register
from daprune.models.fused import Conv1DLinear, FusedLinear, conv1d_from_linear, equal_split, linear_from_conv1d


class GPT2Block(BlockAdapter):
    def attention_module(self) -> nn.Module:
        return self.layer.attn

    def attn_in(self) -> list[nn.Linear]:
        qkv = self.layer.attn.c_attn
        if not isinstance(qkv, FusedLinear):
            raise RuntimeError(f"block {self.index} is in native form; call to_canonical() first")
        return qkv.parts()

    def attn_out(self) -> nn.Linear:
        return self.layer.attn.c_proj

    def ffn_in(self) -> list[nn.Linear]:
        return [self.layer.mlp.c_fc]

    def ffn_out(self) -> nn.Linear:
        return self.layer.mlp.c_proj

    def ffn_output_scale(self) -> float | None:
        return 1.0  # the MLP's output (c_proj, then dropout: eval) is added to the residual

    def ffn_act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.layer.mlp.act

    @property
    def head_dim(self) -> int:
        return self.layer.attn.head_dim

    def to_canonical(self) -> None:
        attn, mlp = self.layer.attn, self.layer.mlp
        if isinstance(attn.c_attn, Conv1D):
            attn.c_attn = FusedLinear.from_conv1d(attn.c_attn, equal_split(attn.c_attn.nf, ("q", "k", "v")))
        for owner, name in ((attn, "c_proj"), (mlp, "c_fc"), (mlp, "c_proj")):
            if isinstance(getattr(owner, name), Conv1D):
                setattr(owner, name, linear_from_conv1d(getattr(owner, name)))

    def to_native(self) -> None:
        attn, mlp = self.layer.attn, self.layer.mlp
        if isinstance(attn.c_attn, FusedLinear):
            attn.c_attn = attn.c_attn.to_conv1d()
        for owner, name in ((attn, "c_proj"), (mlp, "c_fc"), (mlp, "c_proj")):
            if isinstance(getattr(owner, name), Conv1DLinear):
                setattr(owner, name, conv1d_from_linear(getattr(owner, name)))

    def layout_attributes(self) -> dict[str, int]:
        return {
            "attn.split_size": self.n_heads * self.head_dim,  # c_attn(x).split(split_size): q | k | v
            "attn.num_heads": self.n_heads,  # not read by the forward; kept truthful
        }


@register
class GPT2Adapter(ModelAdapter):
    model_types = ("gpt2",)
    shape_keys = {"heads": "n_head", "kv_heads": None, "channels": "n_inner"}
    head_dim_key = None

    def __init__(self, model: nn.Module):
        super().__init__(model)
        if getattr(self.config, "add_cross_attention", False):
            raise UnsupportedModelError("GPT-2 with cross-attention blocks is not supported (decoder-only models)")

    def layers(self) -> nn.ModuleList:
        return self.model.transformer.h

    def final_norm(self) -> nn.Module:
        return self.model.transformer.ln_f

    def native_biases(self, kind: str) -> bool:
        return True  # every Conv1D has a bias

    def block(self, index: int, layer: nn.Module | None = None) -> GPT2Block:
        return GPT2Block(self.layers()[index] if layer is None else layer, index)
