"""Checkpoint tensor names vs the model's own: transformers' renaming rules, applied where daprune reads.

Why: transformers 5 loads some families through renaming rules (GPT-NeoX stores its LM head as
``embed_out.weight`` and loads it as ``lm_head.weight``). daprune reads tensors itself in three places
(streaming reader, ``daprune.load`` of per-layer folders, the remote code), so each must apply the same
rules, or a tensor is silently missing (a random LM head). Only pure renamings are applied here; a family
whose checkpoints need tensor conversions (MoE experts stored per expert, loaded as fused 3-D parameters)
is read only through ``from_pretrained`` (:func:`converts_tensors`), never streamed.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn


def renamer(model: nn.Module) -> Callable[[str], str]:
    """Map a checkpoint key to the model's parameter name (identity when the family has no rules)."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # older transformers: no renaming rules
        return lambda key: key
    rules = [t for t in get_model_conversion_mapping(model, add_legacy=False) if isinstance(t, WeightRenaming)]

    def rename(key: str) -> str:
        for rule in rules:
            key, _ = rule.rename_source_key(key)
        return key

    return rename


def renamed(tensors: dict, model: nn.Module) -> dict:
    """``tensors`` with checkpoint keys renamed to the model's parameter names."""
    rename = renamer(model)
    return {rename(k): v for k, v in tensors.items()}


def converts_tensors(model: nn.Module) -> bool:
    """Whether transformers loads this family's checkpoints through conversions that are not renamings
    (e.g. per-expert MoE tensors merged into fused 3-D parameters): file keys then cannot be compared with
    the model's parameter names one by one."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:
        return False
    return any(not isinstance(t, WeightRenaming) for t in get_model_conversion_mapping(model, add_legacy=False))
