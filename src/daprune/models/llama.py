"""Llama-shaped decoders: Llama, Mistral, Qwen2, Qwen3, Granite, Gemma, Gemma-2, Gemma-3 (text).

They share one block layout: ``self_attn.{q,k,v,o}_proj`` and a gated FFN ``mlp.{gate,up,down}_proj``
with ``mlp.act_fn`` (SiLU: SwiGLU; Gemma: GELU-tanh, GeGLU). What differs between them (Qwen2's q/k/v
biases, Qwen3's and Gemma-3's per-head q/k norms, Gemma's (1 + w) RMSNorms and post-norms, sliding-window
layers, logit soft-capping, embedding scaling, Granite's multipliers) is computed by the model's own
forward and needs no code here: per-head norms act on head_dim, which never changes.

Not here: OLMo-2, whose q/k RMSNorm spans all heads of the projection at once, so removing a head
would change how the kept heads are normalised (pruning would not equal masking).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from daprune.models.adapter import BlockAdapter, ModelAdapter, family_of, register


class LlamaBlock(BlockAdapter):
    def attention_module(self) -> nn.Module:
        return self.layer.self_attn

    def ffn_module(self) -> nn.Module:
        return self.layer.mlp

    def attn_in(self) -> list[nn.Linear]:
        a = self.layer.self_attn
        return [a.q_proj, a.k_proj, a.v_proj]

    def attn_out(self) -> nn.Linear:
        return self.layer.self_attn.o_proj

    def ffn_in(self) -> list[nn.Linear]:
        return [self.layer.mlp.gate_proj, self.layer.mlp.up_proj]

    def ffn_out(self) -> nn.Linear:
        return self.layer.mlp.down_proj

    def ffn_act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.layer.mlp.act_fn

    def ffn_output_scale(self) -> float | None:
        # the MLP's output is down_proj's; Gemma-2/3 RMS-normalise it before the residual add, Granite scales it
        if getattr(self.layer, "post_feedforward_layernorm", None) is not None:
            return None
        return getattr(self.layer, "residual_multiplier", 1.0)

    def ffn_output_gain(self, o: torch.Tensor) -> torch.Tensor | float | None:
        # Gemma-2/3: block output += norm(o) = g * o / rms(o). Along o the norm is blind (scale-invariant); across
        # it, it multiplies by g / rms(o). g is read from the model's own norm (Gemma's is 1 + w) on a row of ones.
        norm = getattr(self.layer, "post_feedforward_layernorm", None)
        if norm is None:
            return super().ffn_output_gain(o)
        eps = float(getattr(norm, "eps", getattr(norm, "variance_epsilon", 0.0)))
        with torch.no_grad():
            g = norm(torch.ones(o.shape[-1], dtype=o.dtype, device=o.device)).float() * math.sqrt(1.0 + eps)
        return g / torch.sqrt(o.float().pow(2).mean(-1, keepdim=True) + eps)

    def ffn_output_gain_known(self) -> bool:
        return getattr(self.layer, "post_feedforward_layernorm", None) is not None or super().ffn_output_gain_known()

    def ffn_output_delta(self, o_old: torch.Tensor, o_new: torch.Tensor) -> torch.Tensor | None:
        norm = getattr(self.layer, "post_feedforward_layernorm", None)
        if norm is not None:
            return norm(o_new) - norm(o_old)
        return super().ffn_output_delta(o_old, o_new)

    @property
    def head_dim(self) -> int:
        return self.layer.self_attn.head_dim

    def layout_attributes(self) -> dict[str, int]:
        # the attention kernels repeat K/V by this factor; the MLP keeps its width for reference only
        attrs = {"self_attn.num_key_value_groups": self.group_size}
        if hasattr(self.layer.mlp, "intermediate_size"):
            attrs["mlp.intermediate_size"] = self.n_channels
        return attrs


@register
class LlamaFamilyAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "gemma3_text")

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def block(self, index: int, layer: nn.Module | None = None) -> LlamaBlock:
        return LlamaBlock(self.layers()[index] if layer is None else layer, index)

    # config flags that give every block's attention / MLP linears biases (Mistral and Qwen2 have none)
    _BIAS_FLAGS = {"llama": {"attention": "attention_bias", "mlp": "mlp_bias"},
                   "granite": {"attention": "attention_bias", "mlp": "mlp_bias"},
                   "qwen3": {"attention": "attention_bias"},
                   "gemma": {"attention": "attention_bias"},
                   "gemma2": {"attention": "attention_bias"},
                   "gemma3_text": {"attention": "attention_bias"}}

    def bias_flag(self, kind: str) -> str | None:
        return self._BIAS_FLAGS.get(family_of(self.config) or "", {}).get(kind)
