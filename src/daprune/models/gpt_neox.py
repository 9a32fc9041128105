"""GPT-NeoX decoders (Pythia, ...): LayerNorm, partial RoPE, multi-head attention, plain FFN, and
usually a parallel residual (attention and MLP both read the block input), which needs nothing here
because layers run through the model's own forward.

``attention.query_key_value`` interleaves q, k, v per head (rows ``[head, q|k|v, head_dim]``); in canonical
form it is a :class:`FusedLinear` with ``interleave=head_dim`` that reproduces that layout. The forward
derives the head count from the output width (``view(..., -1, 3 * head_size)``), so no attribute follows
the block's shape; ``head_size`` is derived from hidden size / heads, so fewer heads need per-layer records.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from daprune.models.adapter import BlockAdapter, ModelAdapter, register
from daprune.models.fused import FusedLinear, equal_split


class GPTNeoXBlock(BlockAdapter):
    def attention_module(self) -> nn.Module:
        return self.layer.attention

    def attn_in(self) -> list[nn.Linear]:
        qkv = self.layer.attention.query_key_value
        if not isinstance(qkv, FusedLinear):
            raise RuntimeError(f"block {self.index} is in native form; call to_canonical() first")
        return qkv.parts()

    def attn_out(self) -> nn.Linear:
        return self.layer.attention.dense

    def ffn_in(self) -> list[nn.Linear]:
        return [self.layer.mlp.dense_h_to_4h]

    def ffn_out(self) -> nn.Linear:
        return self.layer.mlp.dense_4h_to_h

    def ffn_output_scale(self) -> float | None:
        return 1.0  # parallel or not, the MLP's output (dropout: eval) is added to the block output

    def ffn_act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.layer.mlp.act

    @property
    def head_dim(self) -> int:
        return self.layer.attention.head_size

    def to_canonical(self) -> None:
        attn = self.layer.attention
        if not isinstance(attn.query_key_value, FusedLinear):
            sizes = equal_split(attn.query_key_value.out_features, ("q", "k", "v"))
            attn.query_key_value = FusedLinear.from_linear(attn.query_key_value, sizes, interleave=self.head_dim)

    def to_native(self) -> None:
        attn = self.layer.attention
        if isinstance(attn.query_key_value, FusedLinear):
            attn.query_key_value = attn.query_key_value.to_linear()


@register
class GPTNeoXAdapter(ModelAdapter):
    model_types = ("gpt_neox",)
    shape_keys = {"heads": "num_attention_heads", "kv_heads": None, "channels": "intermediate_size"}
    head_dim_key = None

    def layers(self) -> nn.ModuleList:
        return self.model.gpt_neox.layers

    def final_norm(self) -> nn.Module:
        return self.model.gpt_neox.final_layer_norm

    def block(self, index: int, layer: nn.Module | None = None) -> GPTNeoXBlock:
        return GPTNeoXBlock(self.layers()[index] if layer is None else layer, index)

    def bias_flag(self, kind: str) -> str | None:
        # attention biases follow ``attention_bias``; the MLP's linears always have biases
        return "attention_bias" if kind == "attention" else None

    def native_biases(self, kind: str) -> bool:
        return kind == "mlp"
