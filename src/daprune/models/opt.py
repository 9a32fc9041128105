"""OPT decoders: pre- or post-LayerNorm blocks, learned positions, multi-head attention, plain FFN.

The block is already canonical (separate ``q/k/v/out_proj`` and ``fc1 -> activation -> fc2`` on the
layer itself). The attention forward splits heads by ``self_attn.num_heads``, which follows the block's
shape; ``head_dim`` is derived from hidden size / heads, so fewer heads need per-layer records.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from daprune.models.adapter import BlockAdapter, ModelAdapter, register


class OPTBlock(BlockAdapter):
    def attention_module(self) -> nn.Module:
        return self.layer.self_attn

    def attn_in(self) -> list[nn.Linear]:
        a = self.layer.self_attn
        return [a.q_proj, a.k_proj, a.v_proj]

    def attn_out(self) -> nn.Linear:
        return self.layer.self_attn.out_proj

    def ffn_in(self) -> list[nn.Linear]:
        return [self.layer.fc1]

    def ffn_out(self) -> nn.Linear:
        return self.layer.fc2

    def ffn_output_scale(self) -> float | None:
        # post-LN OPT (350m) normalises the residual sum itself: not a change the block's output can just add
        return 1.0 if self.layer.do_layer_norm_before else None

    def ffn_act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.layer.activation_fn

    @property
    def head_dim(self) -> int:
        return self.layer.self_attn.head_dim

    def layout_attributes(self) -> dict[str, int]:
        return {"self_attn.num_heads": self.n_heads}  # the forward views q/k/v as [.., num_heads, head_dim]


@register
class OPTAdapter(ModelAdapter):
    model_types = ("opt",)
    shape_keys = {"heads": "num_attention_heads", "kv_heads": None, "channels": "ffn_dim"}
    head_dim_key = None

    def layers(self) -> nn.ModuleList:
        return self.model.model.decoder.layers

    def final_norm(self) -> nn.Module | None:
        """OPT-350m has none (post-norm blocks) but projects to the embedding width before the LM head."""
        dec = self.model.model.decoder
        steps = [m for m in (dec.final_layer_norm, dec.project_out) if m is not None]
        return nn.Sequential(*steps) if steps else None

    def block(self, index: int, layer: nn.Module | None = None) -> OPTBlock:
        return OPTBlock(self.layers()[index] if layer is None else layer, index)

    def bias_flag(self, kind: str) -> str | None:
        # one flag for all linears: it can only be named when it is already set (else setting it for one
        # kind would make from_pretrained expect biases of the other kind too)
        return "enable_bias" if getattr(self.config, "enable_bias", False) else None
