"""Remote code for daprune models whose blocks have different head counts or FFN widths.

Written next to ``config.json`` by ``daprune`` so that ``AutoModelForCausalLM.from_pretrained(DIR,
trust_remote_code=True)`` (and tools built on it, such as lm-eval) can load a non-uniform pruned model.

No modeling code is copied here: each class subclasses the installed transformers' own
``*ForCausalLM`` and, after the parent builds the dense-shaped skeleton, resizes every block's linears
to the shapes recorded for it in ``config.daprune_layers`` (``modules``: weight shape per linear, in the
family's own layout, e.g. GPT-2's transposed Conv1D; ``tensors``: other parameters pruning reshapes, such
as the fused 3-D expert weights of mixture-of-experts layers) and sets the module attributes recorded with them
(``attributes``: head counts or split sizes the family's forward reads; one under ``...config.`` gives
that module its own copy of the config first). Linears named in ``config.daprune_extra_biases`` get a
bias (FLAP's bias compensation on families whose config has no bias flag for them, e.g. Qwen2's o_proj;
vanilla transformers would drop those, so such folders ship this file even when every block has the same
shape). The safetensors weights then load into those shapes as usual. The file needs only torch and
transformers, not daprune; daprune's own loader uses the same functions.
"""

from __future__ import annotations

import copy

import torch
import transformers
from torch import nn


def _resized(module: nn.Module, shape) -> nn.Module:
    """A fresh module like ``module`` (bias, dtype, device: meta while from_pretrained builds) of weight ``shape``."""
    w = module.weight
    bias = getattr(module, "bias", None) is not None
    if isinstance(module, nn.Linear):
        return nn.Linear(int(shape[1]), int(shape[0]), bias=bias, device=w.device, dtype=w.dtype)
    if type(module).__name__ == "Conv1D":  # GPT-2 style: weight [in, out]
        new = copy.copy(module)
        new._parameters = dict(module._parameters)
        new.weight = nn.Parameter(torch.empty(int(shape[0]), int(shape[1]), device=w.device, dtype=w.dtype))
        if bias:
            new.bias = nn.Parameter(torch.empty(int(shape[1]), device=w.device, dtype=w.dtype))
        new.nf = int(shape[1])
        return new
    raise TypeError(f"cannot resize a {type(module).__name__}")


def set_path(root: nn.Module, dotted: str, value) -> None:
    """Set a dotted attribute; a path through ``config`` gets that module its own config copy first."""
    parts = dotted.split(".")
    obj = root
    for part in parts[:-1]:
        if part == "config":
            obj.config = copy.copy(obj.config)
        obj = getattr(obj, part) if not part.isdigit() else obj[int(part)]
    setattr(obj, parts[-1], value)


def _legacy_modules(block: nn.Module, shape: dict) -> dict:
    """Module shapes of records written before ``modules`` existed (Llama-shaped families only)."""
    attn, hidden = block.self_attn, block.self_attn.q_proj.in_features
    q, kv = int(shape["num_attention_heads"]) * attn.head_dim, int(shape["num_key_value_heads"]) * attn.head_dim
    inter = int(shape["intermediate_size"])
    return {"self_attn.q_proj": [q, hidden], "self_attn.k_proj": [kv, hidden], "self_attn.v_proj": [kv, hidden],
            "self_attn.o_proj": [hidden, q], "mlp.gate_proj": [inter, hidden], "mlp.up_proj": [inter, hidden],
            "mlp.down_proj": [hidden, inter]}


def resize_block(block: nn.Module, record: dict) -> None:
    """Give one decoder block the module shapes and layout attributes recorded for it."""
    modules = record.get("modules") or _legacy_modules(block, record)
    for name, shape in modules.items():
        parent, _, attr = name.rpartition(".")
        owner = block.get_submodule(parent) if parent else block
        old = getattr(owner, attr)
        if list(old.weight.shape) != list(shape):
            setattr(owner, attr, _resized(old, shape))
    for name, shape in (record.get("tensors") or {}).items():  # fused 3-D expert weights
        parent, _, attr = name.rpartition(".")
        owner = block.get_submodule(parent) if parent else block
        old = getattr(owner, attr)
        if list(old.shape) != list(shape):
            setattr(owner, attr, nn.Parameter(torch.empty([int(d) for d in shape], device=old.device,
                                                          dtype=old.dtype), requires_grad=old.requires_grad))
    attributes = record.get("attributes")
    if attributes is None and "modules" not in record:  # legacy Llama-shaped record
        attributes = {"self_attn.num_key_value_groups":
                      int(record["num_attention_heads"]) // int(record["num_key_value_heads"])}
    for name, value in (attributes or {}).items():
        set_path(block, name, value)


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
    records = getattr(model.config, "daprune_layers", None)
    biases = list(getattr(model.config, "daprune_extra_biases", None) or [])
    blocks = model.get_submodule(getattr(model.config, "daprune_layers_path", None) or "model.layers")
    if records and len(records) != len(blocks):
        raise ValueError(f"config.daprune_layers has {len(records)} entries for {len(blocks)} layers")
    for i, block in enumerate(blocks):
        if records:
            resize_block(block, records[i])
        _add_biases(block, biases)


class DaprunePerLayerShapes:
    """Mixin: run the transformers parent's __init__, then apply the per-layer shapes."""

    def __init__(self, config, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_daprune_layers(self)


# config.model_type -> (class name that daprune writes into config.auto_map, transformers parent class)
FAMILIES = {
    "llama": ("DapruneLlamaForCausalLM", "LlamaForCausalLM"),
    "mistral": ("DapruneMistralForCausalLM", "MistralForCausalLM"),
    "qwen2": ("DapruneQwen2ForCausalLM", "Qwen2ForCausalLM"),
    "qwen3": ("DapruneQwen3ForCausalLM", "Qwen3ForCausalLM"),
    "granite": ("DapruneGraniteForCausalLM", "GraniteForCausalLM"),
    "gemma": ("DapruneGemmaForCausalLM", "GemmaForCausalLM"),
    "gemma2": ("DapruneGemma2ForCausalLM", "Gemma2ForCausalLM"),
    "gemma3_text": ("DapruneGemma3ForCausalLM", "Gemma3ForCausalLM"),
    "phi3": ("DaprunePhi3ForCausalLM", "Phi3ForCausalLM"),
    "opt": ("DapruneOPTForCausalLM", "OPTForCausalLM"),
    "gpt2": ("DapruneGPT2LMHeadModel", "GPT2LMHeadModel"),
    "gpt_neox": ("DapruneGPTNeoXForCausalLM", "GPTNeoXForCausalLM"),
    "mixtral": ("DapruneMixtralForCausalLM", "MixtralForCausalLM"),
    "qwen2_moe": ("DapruneQwen2MoeForCausalLM", "Qwen2MoeForCausalLM"),
    "qwen3_moe": ("DapruneQwen3MoeForCausalLM", "Qwen3MoeForCausalLM"),
}
CLASSES = {model_type: name for model_type, (name, _) in FAMILIES.items()}
# A per-layer folder's config.json says model_type "daprune_<family>" (and an auto_map to the classes here), as
# DeciLM checkpoints do: vanilla transformers does not know the type, so loading without remote code stops at
# once with "pass trust_remote_code=True" instead of building a full-size model and failing on every shape.
PREFIX = "daprune_"


def base_model_type(model_type):
    """The family's own model type for a daprune per-layer type ("daprune_llama" -> "llama"); others unchanged."""
    if isinstance(model_type, str) and model_type.startswith(PREFIX) and model_type[len(PREFIX):] in FAMILIES:
        return model_type[len(PREFIX):]
    return model_type


def config_class_name(model_type: str) -> str:
    """Name of the config class here for a family, e.g. "DapruneLlamaConfig"."""
    name = CLASSES[model_type]
    return name.replace("ForCausalLM", "Config").replace("LMHeadModel", "Config")

def _share_renamings(name: str, parent: str, model_type: str = "") -> None:
    """Give the subclass its parent's checkpoint renaming rules (e.g. GPT-NeoX's embed_out -> lm_head).

    transformers looks the rules up by class name and skips custom-code classes without their own entry,
    so without this a tensor the family renames would be silently missing.
    """
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )
    except ImportError:  # older transformers: no renaming rules
        return
    rules = get_checkpoint_conversion_mapping(parent) or (get_checkpoint_conversion_mapping(model_type)
                                                          if model_type else None)
    if rules:
        for key in (name, PREFIX + model_type):
            register_checkpoint_conversion_mapping(key, rules, overwrite=True)


for _type, (_name, _parent) in FAMILIES.items():  # one config and model subclass per family transformers has
    if hasattr(transformers, _parent):
        _model = getattr(transformers, _parent)
        _config = type(config_class_name(_type), (_model.config_class,),
                       {"model_type": PREFIX + _type, "__doc__": f"{_model.config_class.__name__} of a per-layer "
                        "pruned model (its own model type, so only code that can resize blocks loads it)."})
        globals()[_config.__name__] = _config
        globals()[_name] = type(_name, (DaprunePerLayerShapes, _model),
                                {"config_class": _config,
                                 "__doc__": f"{_parent} with per-layer head counts and FFN widths."})
        _share_renamings(_name, _parent, _type)
