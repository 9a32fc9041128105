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
from importlib import resources
from pathlib import Path

import torch

from daprune.errors import ModelSourceError, OutputError
from daprune.models.adapter import EXTRA_BIASES_KEY


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
    """Yield a temp folder; on success it replaces ``out`` in one rename, on failure it is removed.

    The temp folder (``.OUT.tmp-PID-HOST-*``) and, on overwrite, the replaced output (``.OUT.old-PID-HOST``)
    name their owning process, so that leftovers of a process killed meanwhile (``kill -9``) are removed
    here, before the new temp folder is made; a live process's folders are never touched.
    """
    from daprune.checkpoint import owner_tag, remove_stale_siblings

    out = check_output(out, overwrite)
    out.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_siblings(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{owner_tag()}-", dir=out.parent))
    try:
        yield tmp
        if out.exists():
            old = out.with_name(f".{out.name}.old-{owner_tag()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_json(path: Path, data: dict) -> None:
    """Indented JSON with a trailing newline; tensors and paths become lists and strings (reports hold both)."""
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n")


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


MODELING_FILE = "modeling_daprune.py"
_REMOTE_MODULE = MODELING_FILE.removesuffix(".py")


def save_pruned(model, tokenizer, out: str | os.PathLike, report: dict, *, overwrite: bool = False,
                extra: Callable[[Path], None] | None = None) -> Path:
    """Save weights (safetensors), config, tokenizer and report.json into ``out`` atomically.

    Non-uniform models (``config.daprune_layers``) and models with biases their family's config cannot
    express (``config.daprune_extra_biases``, FLAP on Mistral / Qwen2 / Qwen3) also get
    ``modeling_daprune.py`` and a ``config.auto_map`` entry, so ``from_pretrained(DIR,
    trust_remote_code=True)`` rebuilds them; the others stay plain transformers folders with no remote code.
    """
    _sync_config(model)
    with atomic_dir(out, overwrite) as tmp:
        model.save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise OutputError("the model was not written as safetensors")
        write_remote_code(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "report.json", report)
        if extra is not None:
            extra(tmp)
    return Path(out)


def _sync_config(model) -> None:
    """Make the config describe the weights about to be written (blocks may have been sliced by hand)."""
    from daprune.errors import UnsupportedModelError
    from daprune.models.adapter import get_adapter

    try:
        adapter = get_adapter(model)
    except UnsupportedModelError:
        return
    adapter.update_config()


def modeling_template() -> str:
    """Text of the remote-code file shipped as package data."""
    return resources.files("daprune").joinpath("io_templates", MODELING_FILE).read_text()


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


def write_remote_code(folder: Path) -> None:
    """Add or strip the remote-code file and its ``auto_map`` in a saved folder.

    Added when ``needs_remote_code``: non-uniform shapes, or extra biases (see there) even with uniform
    shapes, since vanilla transformers cannot load extra biases for those families; such a folder loads
    correctly only with ``trust_remote_code=True`` or through ``daprune.load``. Stripped otherwise.
    """
    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    auto_map = {k: v for k, v in cfg.get("auto_map", {}).items() if not str(v).startswith(f"{_REMOTE_MODULE}.")}
    if needs_remote_code(cfg):
        auto_map["AutoModelForCausalLM"] = f"{_REMOTE_MODULE}.{_remote_class(cfg.get('model_type'))}"
        (folder / MODELING_FILE).write_text(modeling_template())
    else:
        (folder / MODELING_FILE).unlink(missing_ok=True)
    if auto_map:
        cfg["auto_map"] = auto_map
    else:
        cfg.pop("auto_map", None)
    write_json(cfg_path, cfg)


def _remote_class(model_type: str | None) -> str:
    """Class in modeling_daprune.py for a model type; read from the template so the two cannot drift."""
    from daprune.io_templates.modeling_daprune import CLASSES

    if model_type not in CLASSES:
        raise OutputError(f"no per-layer remote code for model type {model_type!r}; supported: {sorted(CLASSES)}")
    return CLASSES[model_type]


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
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    if not needs_remote_code(config):
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=DTYPES[dtype], trust_remote_code=False)
    else:
        model = _load_nonuniform(folder, config, getattr(config, "daprune_layers", None), DTYPES[dtype])
    return model.to(device).eval(), _load_tokenizer(folder)


def _load_nonuniform(folder: Path, config, layers: list[dict] | None, dtype: torch.dtype):
    """Build the dense skeleton, slice it to the recorded shapes and add the recorded extra biases, then load
    the safetensors state (strictly: a tensor the skeleton has no place for is an error, not a silent drop)."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from daprune.models.adapter import get_adapter

    model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    reshape_layers(get_adapter(model), layers)
    from daprune.models.checkpoint_keys import renamed

    state = {}
    for f in sorted(folder.glob("*.safetensors")):
        state.update(load_file(str(f)))
    missing, unexpected = model.load_state_dict(renamed(state, model), strict=False)
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in missing if not (tied and k.endswith("lm_head.weight"))]
    if missing or unexpected:
        raise ModelSourceError(f"weights do not match the config: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.tie_weights()
    return model


def _load_tokenizer(folder: Path):
    """The folder's tokenizer, or None when it was saved without one."""
    from transformers import AutoTokenizer

    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((folder / n).is_file() for n in names):
        return None
    return AutoTokenizer.from_pretrained(folder)


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


def probe_writable(out: str | os.PathLike) -> Path:
    """Really try to create a file where ``out`` will be written; OutputError with the reason if not.

    ``check_output`` trusts ``os.access``, which says yes to root on read-only mounts and does not notice
    that an ancestor of ``out`` is a regular file; hours of pruning would then end in a traceback.
    """
    out = Path(out).expanduser().absolute()
    probe = out.parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"cannot write {out}: {probe} is a file, not a folder")
    try:
        fd, name = tempfile.mkstemp(prefix=f".{out.name}.probe-", dir=probe)
    except OSError as exc:
        raise OutputError(f"cannot write to {probe}: {exc.strerror or exc}") from exc
    os.close(fd)
    os.unlink(name)
    return out
