"""Phi-3 decoders: Llama-like (RMSNorm, RoPE, GQA, SwiGLU) with fused ``qkv_proj`` and ``gate_up_proj``.

In canonical form the two fused projections are :class:`FusedLinear` (``q, k, v`` / ``gate, up``) whose
output has the fused layout, so Phi-3's forward splits it as before. That forward finds the end of the
query rows from ``self.config.num_attention_heads`` and the key rows from ``num_key_value_heads``: after
head pruning each pruned block's attention gets its own copy of the config with its own counts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from daprune.models.adapter import BlockAdapter, ModelAdapter, register
from daprune.models.fused import FusedLinear, equal_split

# attribute paths through a module's config: that module gets its own config copy before they are set


class Phi3Block(BlockAdapter):
    def attention_module(self) -> nn.Module:
        return self.layer.self_attn

    def attn_in(self) -> list[nn.Linear]:
        return self._fused(self.layer.self_attn.qkv_proj).parts()

    def attn_out(self) -> nn.Linear:
        return self.layer.self_attn.o_proj

    def ffn_in(self) -> list[nn.Linear]:
        return self._fused(self.layer.mlp.gate_up_proj).parts()

    def ffn_out(self) -> nn.Linear:
        return self.layer.mlp.down_proj

    def ffn_output_scale(self) -> float | None:
        return 1.0  # the MLP's output (dropout: eval) is added to the residual

    def ffn_act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.layer.mlp.activation_fn

    @property
    def head_dim(self) -> int:
        return self.layer.self_attn.head_dim

    def _fused(self, module: nn.Module) -> FusedLinear:
        if not isinstance(module, FusedLinear):
            raise RuntimeError(f"block {self.index} is in native form; call to_canonical() first")
        return module

    def to_canonical(self) -> None:
        attn, mlp = self.layer.self_attn, self.layer.mlp
        if not isinstance(attn.qkv_proj, FusedLinear):
            kv = attn.num_key_value_heads * attn.head_dim
            q = attn.qkv_proj.out_features - 2 * kv
            attn.qkv_proj = FusedLinear.from_linear(attn.qkv_proj, {"q": q, "k": kv, "v": kv})
        if not isinstance(mlp.gate_up_proj, FusedLinear):
            sizes = equal_split(mlp.gate_up_proj.out_features, ("gate", "up"))  # forward: chunk(2) -> gate, up
            mlp.gate_up_proj = FusedLinear.from_linear(mlp.gate_up_proj, sizes)

    def to_native(self) -> None:
        attn, mlp = self.layer.self_attn, self.layer.mlp
        if isinstance(attn.qkv_proj, FusedLinear):
            attn.qkv_proj = attn.qkv_proj.to_linear()
        if isinstance(mlp.gate_up_proj, FusedLinear):
            mlp.gate_up_proj = mlp.gate_up_proj.to_linear()

    def layout_attributes(self) -> dict[str, int]:
        return {
            # through ``config``: the base class's setter gives this block its own config copy, since the
            # blocks share one and the forward reads the counts from it
            "self_attn.config.num_attention_heads": self.n_heads,  # where the forward cuts the query rows
            "self_attn.config.num_key_value_heads": self.n_kv_heads,
            "self_attn.num_key_value_heads": self.n_kv_heads,  # where it cuts key from value rows
            "self_attn.num_key_value_groups": self.group_size,  # K/V repeat factor of the eager kernel
        }

    def on_ffn_changed(self, n_channels: int) -> None:
        """Nothing to do: ``chunk(2)`` splits gate from up by the output's width."""


@register
class Phi3Adapter(ModelAdapter):
    model_types = ("phi3",)
    shape_keys = {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "channels": "intermediate_size"}
    head_dim_key = "head_dim"

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def block(self, index: int, layer: nn.Module | None = None) -> Phi3Block:
        return Phi3Block(self.layers()[index] if layer is None else layer, index)
