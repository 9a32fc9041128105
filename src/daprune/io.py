"""Writing pruned models atomically, and loading them back (uniform and non-uniform).

An output folder only ever appears complete: everything is written into a hidden temp folder beside
it and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

from daprune.errors import ModelSourceError, OutputError


def check_output(out: str | os.PathLike, overwrite: bool = False) -> Path:
    """Refuse early (before any work) an output path that exists or cannot be written."""
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise OutputError(f"output folder {out} already exists; pass --overwrite to replace it")
    parent = out.resolve().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK):
        raise OutputError(f"cannot write to {parent}")
    return out


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``out`` in one rename, on failure it is removed."""
    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def save_pruned(model, tokenizer, out: str | os.PathLike, report: dict, *, overwrite: bool = False,
                extra: Callable[[Path], None] | None = None) -> Path:
    """Save weights (safetensors), config, tokenizer and report.json into ``out`` atomically."""
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "report.json", report)
        if extra is not None:
            extra(tmp)
    return Path(out)


def load_pruned(folder: str | os.PathLike, *, dtype: str = "float32", device: str = "cpu"):
    """Load a daprune output folder, including non-uniform ones, without remote code."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from daprune.models.adapter import get_adapter
    from daprune.models.loading import DTYPES

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ModelSourceError(f"{folder} is not a model folder (no config.json)")
    config = AutoConfig.from_pretrained(folder)
    layers = getattr(config, "daprune_layers", None)
    if layers is None:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype])
    else:
        from safetensors.torch import load_file

        model = AutoModelForCausalLM.from_config(config, dtype=DTYPES[dtype])
        adapter = get_adapter(model)
        reshape_layers(adapter, layers)
        state = {}
        for f in sorted(folder.glob("*.safetensors")):
            state.update(load_file(str(f)))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight")]
        if missing or unexpected:
            raise ModelSourceError(
                f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}"
            )
        model.tie_weights()
    tok = AutoTokenizer.from_pretrained(folder)
    return model.to(device).eval(), tok


def reshape_layers(adapter, layers: list[dict]) -> None:
    """Shrink freshly initialised blocks to the per-layer shapes recorded in the config."""
    for i, shape in enumerate(layers):
        block = adapter.block(i)
        heads = shape["num_attention_heads"]
        kv = shape["num_key_value_heads"]
        per = heads // kv
        block.slice_heads([g * block.group_size + j for g in range(kv) for j in range(per)])
        block.slice_ffn(range(shape["intermediate_size"]))
