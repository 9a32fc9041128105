"""Model weights by name: reading a checkpoint's safetensors lazily, and putting tensors into modules.

Why: a model larger than memory is pruned from the meta-device skeleton, so every tensor is read by
name when it is needed (:class:`WeightsReader` opens the checkpoint's shards, ``model.safetensors.index.json``
for sharded ones, and reads only the tensors asked for via ``safetensors.safe_open``) and put in place
by name (:func:`assign_tensors`). The helpers that map between modules, parameters and their names
(tied LM heads included) and count parameters (meta tensors included) live here with it.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from daprune.errors import CorruptWeightsError, WeightsMismatchError

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
# tensors some checkpoints carry that current transformers recompute (never weights): ignored when present
_IGNORED_EXTRA = ("rotary_emb.inv_freq",)


class WeightsReader:
    """Lazy, validated access to a folder's safetensors weights; opening it reads headers only.

    A truncated shard, a file that is not safetensors, or an index naming a missing shard raises
    :class:`CorruptWeightsError` here, before any work, instead of deep inside ``from_pretrained``.
    """

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptWeightsError(f"{index} is not a valid safetensors index: {exc}") from exc
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CorruptWeightsError(f"{index} names shard(s) that do not exist: {', '.join(missing[:3])}")
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        self.files = files
        self.file_key: dict[str, str] = {}  # the model's name of a tensor -> its name in the checkpoint
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        self.dtypes: dict[str, str] = {}  # safetensors dtype names ("F32", "BF16", ...)
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as fh:
                    names = fh.keys()  # safe_open handles are not iterable
                    for key in names:
                        self.where[key] = f
                        self.file_key[key] = key
                        self.shapes[key] = tuple(fh.get_slice(key).get_shape())
                        self.dtypes[key] = fh.get_slice(key).get_dtype()
            except Exception as exc:  # safetensors raises its own error type (and OSError for unreadable files)
                raise CorruptWeightsError(
                    f"cannot read weights file {f}: {exc} (the file is truncated, corrupt or not safetensors; "
                    "re-download or re-save the model)"
                ) from exc

    @property
    def available(self) -> bool:
        return bool(self.files)

    def floating_dtype(self) -> str | None:
        """The checkpoint's own precision: the floating dtype holding most of its elements ("bfloat16", ...)."""
        names = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64"}
        count: dict[str, int] = {}
        for key, dt in self.dtypes.items():
            if dt in names:
                n = 1
                for d in self.shapes[key]:
                    n *= d
                count[names[dt]] = count.get(names[dt], 0) + n
        return max(count, key=count.get) if count else None

    def get_many(self, keys: Iterable[str], dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read ``keys`` (one open per shard), cast floating tensors to ``dtype``, move to ``device``."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self.where:
                raise WeightsMismatchError(f"tensor {k} is missing from the weights in {self.folder}")
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            try:
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    for k in ks:
                        t = fh.get_tensor(self.file_key[k])
                        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                            t = t.to(dtype)
                        out[k] = t.to(device)
            except (WeightsMismatchError, CorruptWeightsError):
                raise
            except Exception as exc:
                raise CorruptWeightsError(f"cannot read {', '.join(ks[:2])} from {f}: {exc}") from exc
        return {k: out[k] for k in keys}

    def check_against(self, model: nn.Module) -> None:
        """Every tensor the model (skeleton) expects is present with the shape its config implies.

        ``from_pretrained`` would silently random-initialise missing tensors; that must be an error here.
        Checkpoint names are first mapped to the model's with transformers' renaming rules for the family.
        """
        from daprune.models.checkpoint_keys import renamer

        rename = renamer(model)
        old = (self.where, self.shapes, self.file_key)
        self.where = {rename(k): v for k, v in old[0].items()}
        self.shapes = {rename(k): v for k, v in old[1].items()}
        self.file_key = {rename(k): v for k, v in old[2].items()}
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tied = tied_lm_head_key(model)
        missing = [k for k in expected if k not in self.shapes and k != tied]
        wrong = [f"{k} is {list(self.shapes[k])} in the file but the config implies {list(s)}"
                 for k, s in expected.items() if k in self.shapes and self.shapes[k] != s]
        if missing or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})")
            if wrong:
                parts.append(f"{len(wrong)} of the wrong shape ({'; '.join(wrong[:2])})")
            raise WeightsMismatchError(f"the weights in {self.folder} do not match its config.json: "
                                       f"{' and '.join(parts)}")
        extra = [k for k in self.shapes if k not in expected and not k.endswith(_IGNORED_EXTRA)]
        if extra:
            log.warning("ignoring %d tensor(s) the model does not use (e.g. %s)", len(extra), extra[:3])


def module_name(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise ValueError("module not found in the model")


def param_name(root: nn.Module, target: torch.Tensor) -> str:
    for name, p in root.named_parameters():
        if p is target:
            return name
    raise ValueError("parameter not found in the model")


def tied_lm_head_key(model: nn.Module) -> str | None:
    """Name of the output embedding weight when it is the same tensor as the input embedding."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings()
    if out is None or out.weight is not inp.weight:
        return None
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is out.weight and name != param_name(model, inp.weight):
            return name
    return None


def assign_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` (names relative to ``module``) in place as parameters/buffers, adding missing biases."""
    for name, t in tensors.items():
        parent, _, attr = name.rpartition(".")
        mod = module.get_submodule(parent) if parent else module
        if attr in mod._buffers:
            mod._buffers[attr] = t
            continue
        old = mod._parameters.get(attr)
        if old is None and attr not in mod._parameters and not (attr == "bias" and isinstance(mod, nn.Linear)):
            raise WeightsMismatchError(f"unexpected tensor {name} for module {type(mod).__name__}")
        grad = old.requires_grad if old is not None else getattr(mod, "weight", t).requires_grad
        setattr(mod, attr, nn.Parameter(t, requires_grad=grad and t.is_floating_point()))


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied ones once); unlike data_ptr-based counting it also works on meta tensors."""
    return sum(p.numel() for p in model.parameters())
