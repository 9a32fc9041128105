"""Remote code for daprune models whose blocks have different head counts or FFN widths.

Written next to ``config.json`` by ``daprune`` so that ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` (and tools built on it, such as lm-eval) can load a non-uniform pruned model.

No modeling code is copied here: each class subclasses the installed transformers' own
``*ForCausalLM`` and, after the parent builds the dense-shaped skeleton, swaps every block's linears
for ones of the per-layer shapes listed in ``config.daprune_layers``, and gives the linears named in
``config.daprune_extra_biases`` a bias (FLAP's bias compensation on families whose config has no bias
flag for them, e.g. Qwen2's o_proj or Mistral's down_proj; vanilla transformers would drop those, so
such folders ship this file even when every block has the same shape). The safetensors weights then
load into those shapes as usual. The file needs only torch and transformers, not daprune.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM, Qwen3ForCausalLM


def _resized(linear: nn.Linear, in_features: int | None = None, out_features: int | None = None) -> nn.Linear:
    """A fresh Linear like ``linear`` (bias, dtype, device: meta while from_pretrained builds) but resized."""
    return nn.Linear(
        linear.in_features if in_features is None else in_features,
        linear.out_features if out_features is None else out_features,
        bias=linear.bias is not None,
        device=linear.weight.device,
        dtype=linear.weight.dtype,
    )


def _shrink_block(block: nn.Module, shape: dict) -> None:
    """Give one decoder block the attention heads and FFN width recorded for it."""
    attn, mlp = block.self_attn, block.mlp
    heads, kv = int(shape["num_attention_heads"]), int(shape["num_key_value_heads"])
    inter = int(shape["intermediate_size"])
    q_dim, kv_dim = heads * attn.head_dim, kv * attn.head_dim
    attn.q_proj = _resized(attn.q_proj, out_features=q_dim)
    attn.k_proj = _resized(attn.k_proj, out_features=kv_dim)
    attn.v_proj = _resized(attn.v_proj, out_features=kv_dim)
    attn.o_proj = _resized(attn.o_proj, in_features=q_dim)
    # the attention kernels repeat (or group) K/V by this factor, so it must follow the block's own shapes
    attn.num_key_value_groups = heads // kv
    mlp.gate_proj = _resized(mlp.gate_proj, out_features=inter)
    mlp.up_proj = _resized(mlp.up_proj, out_features=inter)
    mlp.down_proj = _resized(mlp.down_proj, in_features=inter)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = inter


def _add_biases(block: nn.Module, names) -> None:
    """Give the block's linears named in ``names`` (e.g. "mlp.down_proj") a bias; the weights fill it."""
    for name in names:
        linear = block.get_submodule(name)
        if linear.bias is None:
            linear.bias = nn.Parameter(torch.zeros(linear.out_features, device=linear.weight.device,
                                                   dtype=linear.weight.dtype))


def apply_daprune_layers(model: nn.Module) -> None:
    """Resize every block of ``model`` to ``config.daprune_layers`` and add ``config.daprune_extra_biases``.

    Either key may be absent (a uniform model with FLAP biases has only the second); no-op without both.
    """
    shapes = getattr(model.config, "daprune_layers", None)
    biases = list(getattr(model.config, "daprune_extra_biases", None) or [])
    blocks = model.model.layers
    if shapes and len(shapes) != len(blocks):
        raise ValueError(f"config.daprune_layers has {len(shapes)} entries for {len(blocks)} layers")
    for i, block in enumerate(blocks):
        if shapes:
            _shrink_block(block, shapes[i])
        _add_biases(block, biases)


class DaprunePerLayerShapes:
    """Mixin: run the transformers parent's __init__, then apply the per-layer shapes."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_daprune_layers(self)


class DapruneLlamaForCausalLM(DaprunePerLayerShapes, LlamaForCausalLM):
    """Llama with per-layer head counts and FFN widths."""


class DapruneMistralForCausalLM(DaprunePerLayerShapes, MistralForCausalLM):
    """Mistral with per-layer head counts and FFN widths."""


class DapruneQwen2ForCausalLM(DaprunePerLayerShapes, Qwen2ForCausalLM):
    """Qwen2 with per-layer head counts and FFN widths."""


class DapruneQwen3ForCausalLM(DaprunePerLayerShapes, Qwen3ForCausalLM):
    """Qwen3 with per-layer head counts and FFN widths."""


# config.model_type -> class name that daprune writes into config.auto_map
CLASSES = {
    "llama": "DapruneLlamaForCausalLM",
    "mistral": "DapruneMistralForCausalLM",
    "qwen2": "DapruneQwen2ForCausalLM",
    "qwen3": "DapruneQwen3ForCausalLM",
}
