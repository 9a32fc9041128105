"""Turning a model folder into a model: whole (:func:`load_pruned`) or as a weightless skeleton.

Why one module: a daprune output may have per-layer shapes (``config.daprune_layers``) and biases its
family's config cannot express (``config.daprune_extra_biases``); every way of building a model from such
a folder (``daprune.load``, evaluation, and a pruned folder used again as a streaming source) must give
the freshly built blocks those shapes before the weights go in. :func:`reshape_layers` does that with
the remote code's own ``resize_block``, so the two cannot drift. Weights are read from safetensors only,
never from pickles.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from daprune.errors import ModelSourceError
from daprune.models.adapter import EXTRA_BIASES_KEY

log = logging.getLogger(__name__)


_REGISTERED = False


def register_auto_classes() -> None:
    """Let transformers' Auto classes build daprune's per-layer model types in this process.

    A per-layer folder says model_type "daprune_<family>" so that vanilla transformers refuses it; daprune
    itself reads such folders with the *installed* package's classes (``io_templates.modeling_daprune``,
    the same code the folder ships), never the folder's copy, so ``trust_remote_code`` stays False.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AutoConfig, AutoModelForCausalLM

    from daprune.io_templates import modeling_daprune

    for name, _parent in modeling_daprune.FAMILIES.values():
        model_cls = getattr(modeling_daprune, name, None)
        if model_cls is None:  # a family this transformers version does not have
            continue
        AutoConfig.register(model_cls.config_class.model_type, model_cls.config_class, exist_ok=True)
        AutoModelForCausalLM.register(model_cls.config_class, model_cls, exist_ok=True)
    _REGISTERED = True


def needs_remote_code(config) -> bool:
    """Whether a saved config (dict or transformers config) describes a model vanilla transformers cannot build.

    True for per-layer shapes (``daprune_layers``) and for extra biases (``daprune_extra_biases``): FLAP's
    compensation biases on o_proj / down_proj of Mistral, Qwen2 and Qwen3's MLP, whose configs have no flag
    for them. Vanilla ``from_pretrained`` (``trust_remote_code=False``) would build those linears without a
    bias, skip the saved bias tensors as unexpected keys and give wrong logits even when shapes are uniform.
    """
    def get(key):
        return config.get(key) if isinstance(config, dict) else getattr(config, key, None)

    return bool(get("daprune_layers") or get(EXTRA_BIASES_KEY))



def load_pruned(folder: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu"):
    """Load a daprune output folder, including non-uniform ones, without remote code.

    Returns ``(model, tokenizer)``; the tokenizer is None when the folder has none (tiny test models).
    Weights are read from safetensors only, never from pickles.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    from daprune.models.loading import DTYPES

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder} is not a model folder (no config.json)")
    if not any(folder.glob("*.safetensors")):
        raise ModelSourceError(f"{folder} has no .safetensors weights")
    # trust_remote_code=False: the folder's own transformers classes, never its modeling_daprune.py
    register_auto_classes()
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if not needs_remote_code(config):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], trust_remote_code=False)
    else:
        model = _load_nonuniform(folder, config, DTYPES[dtype])
    return model.to(device).eval(), load_tokenizer(folder)


def _load_nonuniform(folder: Path, config, dtype: torch.dtype):
    """Load through the remote code's own class, imported from daprune (the folder's copy never runs).

    ``from_pretrained`` of that class builds the dense skeleton, resizes it to the recorded shapes, adds the
    recorded extra biases and loads the safetensors with transformers' own checkpoint conversions
    (renamings such as NeoX's ``embed_out``; per-expert MoE tensors fused into 3-D parameters), so this and
    ``trust_remote_code=True`` are one implementation. Strict: a tensor missing from the folder, one the
    skeleton has no place for, or a shape mismatch is an error, never a silently random weight.
    """
    from daprune.io_templates import modeling_daprune

    name = modeling_daprune.CLASSES.get(modeling_daprune.base_model_type(getattr(config, "model_type", None)))
    cls = getattr(modeling_daprune, name, None) if name else None
    if cls is None:
        raise ModelSourceError(f"{folder}: no per-layer class for model type {config.model_type!r} in this "
                               "transformers version")
    model, info = cls.from_pretrained(folder, config=config, dtype=dtype, output_loading_info=True)
    check_loading_info(model, info, str(folder), unexpected_is_error=True)
    return model


def check_loading_info(model, info: dict, origin: str, *, unexpected_is_error: bool) -> None:
    """Refuse what ``from_pretrained`` could not fill (it random-initialises it) or had to reshape.

    Checked after transformers' own checkpoint conversions (MoE experts stored per expert, loaded fused),
    where file keys cannot be compared with the model's names one by one. A tied LM head is never missing.
    ``unexpected_is_error``: a daprune folder holds exactly its tensors, so an extra one means a wrong shape
    record; a source checkpoint may carry tensors current transformers no longer uses (ignored).
    """
    from daprune.errors import WeightsMismatchError
    from daprune.weights import tied_lm_head_key

    tied = tied_lm_head_key(model)
    missing = sorted(k for k in info.get("missing_keys", []) if k != tied)
    mismatched = list(info.get("mismatched_keys", []))
    unexpected = sorted(info.get("unexpected_keys", [])) if unexpected_is_error else []
    parts = [f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})"] if missing else []
    if mismatched:
        parts.append(f"{len(mismatched)} of the wrong shape (e.g. {mismatched[0]})")
    if unexpected:
        parts.append(f"{len(unexpected)} with no place in the model (e.g. {', '.join(unexpected[:3])})")
    if parts:
        raise WeightsMismatchError(f"the weights of {origin} do not match its config.json: {' and '.join(parts)}")


def load_tokenizer(folder: Path):
    """The folder's tokenizer, None when it has none; a broken one is a TokenizerError, not a traceback."""
    from transformers import AutoTokenizer

    from daprune.errors import TokenizerError

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / n).is_file() for n in names):
        return None
    try:
        return AutoTokenizer.from_pretrained(folder)
    except Exception as exc:
        raise TokenizerError(f"cannot load the tokenizer in {folder}: {exc}") from exc


def reshape_layers(adapter, layers: list[dict] | None) -> None:
    """Shrink freshly initialised blocks to the per-layer records in the config (``layers``; None keeps the
    shapes) and give every block the extra biases listed in ``config.daprune_extra_biases``.

    The resizing is the remote code's own (``modeling_daprune.resize_block``): one implementation for
    ``trust_remote_code`` loading, ``daprune.load`` and a pruned folder used as a streaming source.
    """
    from daprune.io_templates.modeling_daprune import resize_block

    add_extra_biases(adapter)
    if layers is None:
        return
    if len(layers) != adapter.n_layers:
        raise ModelSourceError(f"config.daprune_layers has {len(layers)} entries for {adapter.n_layers} layers")
    for layer, record in zip(adapter.layers(), layers, strict=True):
        resize_block(layer, record)


def add_extra_biases(adapter) -> None:
    """Zero biases (filled by the weights) on the linears named in ``config.daprune_extra_biases``, every block."""
    names = list(getattr(adapter.config, EXTRA_BIASES_KEY, None) or [])
    for i in range(adapter.n_layers if names else 0):
        block = adapter.block(i)
        for name in names:
            block.ensure_bias(name)


def build_skeleton(folder: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The model's module tree on the meta device (shapes only), with the folder's generation config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from daprune.models.adapter import get_adapter

    folder = Path(folder)
    register_auto_classes()  # a daprune per-layer folder as the source: its own model type
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise ModelSourceError(f"cannot read the model config of {folder}: {exc}") from exc
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # on meta tensors from_config leaves tied embeddings as two Parameters; tie them again
    model.eval()
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except Exception as exc:  # a broken generation config should not stop pruning
            log.warning("ignoring unreadable generation_config.json: %s", exc)
    layers = getattr(config, "daprune_layers", None)
    # a daprune output used as source: give the skeleton its per-layer shapes and extra (FLAP) biases
    reshape_layers(get_adapter(model), layers or None)
    return model
