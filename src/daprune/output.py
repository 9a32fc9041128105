"""Writing an output folder: the pruned model's weights, config, remote code, tokenizer and report.json.

Why one module: a folder is written the same way whether the pruned model is in memory or only on disk
(streaming), so both go through :func:`write_output`; only the weights differ
(:func:`model_weights`: ``save_pretrained``; :func:`streamed_weights`: the work folder's block shards).

* An output folder only ever appears complete: everything is written into a hidden temp folder beside
  it and renamed into place at the end (:func:`atomic_dir`); a path that exists or cannot be written is
  refused before any work (:func:`check_output`, :func:`probe_writable`).
* Streamed weights (:func:`write_streaming_output`): embedding shard, the block shards (hard-linked from
  the work folder), final norm / lm_head, a sharded ``model.safetensors.index.json``, config and
  generation config. Tied embeddings write no ``lm_head.weight``, exactly like ``save_pretrained``.
* Non-uniform models and models with extra biases also get ``modeling_daprune.py`` and a
  ``config.auto_map`` entry (:func:`write_remote_code`).
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
from typing import TYPE_CHECKING

import torch

from daprune.atomic import atomic_write_bytes, owner_tag, remove_stale_siblings
from daprune.errors import OutputError, WeightsMismatchError
from daprune.loader import needs_remote_code
from daprune.weights import INDEX_FILE, param_name, tied_lm_head_key

if TYPE_CHECKING:
    from daprune.stores import StreamingStore


# -- the folder ---------------------------------------------------------------------------------------------
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


@contextmanager
def atomic_dir(out: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temp folder; on success it replaces ``out`` in one rename, on failure it is removed.

    The temp folder (``.OUT.tmp-PID-HOST-*``) and, on overwrite, the replaced output (``.OUT.old-PID-HOST``)
    name their owning process, so that leftovers of a process killed meanwhile (``kill -9``) are removed
    here, before the new temp folder is made; a live process's folders are never touched.
    """
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


def write_output(out: str | os.PathLike, weights: Callable[[Path], None], tokenizer, report: dict, *,
                 overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``out`` atomically: ``weights(tmp)`` (see :func:`model_weights`, :func:`streamed_weights`), the
    remote code where needed, the tokenizer (if any), report.json, then ``extra(tmp)`` for added files."""
    with atomic_dir(out, overwrite) as tmp:
        weights(tmp)
        write_remote_code(tmp)
        if tokenizer is not None and hasattr(tokenizer, "save_pretrained"):
            tokenizer.save_pretrained(tmp)
        write_json(tmp / "report.json", report)
        if extra is not None:
            extra(tmp)
    return Path(out)


def save_pruned(model, tokenizer, out: str | os.PathLike, report: dict, *, overwrite: bool = False,
                extra: Callable[[Path], None] | None = None) -> Path:
    """Save an in-memory model's weights (safetensors), config, tokenizer and report.json into ``out`` atomically.

    Non-uniform models (``config.daprune_layers``) and models with biases their family's config cannot
    express (``config.daprune_extra_biases``, FLAP on Mistral / Qwen2 / Qwen3) also get
    ``modeling_daprune.py`` and a ``config.auto_map`` entry, so ``from_pretrained(DIR,
    trust_remote_code=True)`` rebuilds them; the others stay plain transformers folders with no remote code.
    """
    return write_output(out, model_weights(model), tokenizer, report, overwrite=overwrite, extra=extra)


def model_weights(model) -> Callable[[Path], None]:
    """Weights of a model in memory, written by ``save_pretrained``; its config is brought up to date now."""
    _sync_config(model)

    def write(tmp: Path) -> None:
        model.save_pretrained(tmp)
        if not any(tmp.glob("*.safetensors")):
            raise OutputError("the model was not written as safetensors")

    return write


def streamed_weights(store: StreamingStore, block_file: Callable[[int], Path]) -> Callable[[Path], None]:
    """Weights of a streamed model: ``block_file(i)`` is the work folder's shard of pruned block i."""
    return lambda tmp: write_streaming_output(store, block_file, tmp)


def _sync_config(model) -> None:
    """Make the config describe the weights about to be written (blocks may have been sliced by hand)."""
    from daprune.errors import UnsupportedModelError
    from daprune.models.adapter import get_adapter

    try:
        adapter = get_adapter(model)
    except UnsupportedModelError:
        return
    adapter.update_config()


# -- report.json ------------------------------------------------------------------------------------------
def write_json(path: Path, data: dict) -> None:
    """Indented JSON with a trailing newline; tensors and paths become lists and strings (reports hold both)."""
    path.write_text(_json_text(data))


def rewrite_report(out: str | os.PathLike, report: dict) -> None:
    """Replace ``out/report.json`` atomically (e.g. to add evaluation results after the folder exists)."""
    atomic_write_bytes(Path(out) / "report.json", _json_text(report).encode())


def _json_text(data: dict) -> str:
    return json.dumps(data, indent=2, default=_json_default) + "\n"


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"cannot serialise {type(obj).__name__}")


# -- remote code ------------------------------------------------------------------------------------------
MODELING_FILE = "modeling_daprune.py"
_REMOTE_MODULE = MODELING_FILE.removesuffix(".py")


def modeling_template() -> str:
    """Text of the remote-code file shipped as package data."""
    return resources.files("daprune").joinpath("io_templates", MODELING_FILE).read_text()


def write_remote_code(folder: Path) -> None:
    """Add or strip the remote-code file and its ``auto_map`` in a saved folder.

    Added when ``needs_remote_code``: non-uniform shapes, or extra biases (see there) even with uniform
    shapes, since vanilla transformers cannot load extra biases for those families; such a folder loads
    correctly only with ``trust_remote_code=True`` or through ``daprune.load``, so its config gets its own
    model type ("daprune_<family>") and an ``AutoConfig`` entry: vanilla loading then fails at once asking
    for ``trust_remote_code=True``. Stripped otherwise (and the family's own model type restored).
    """
    from daprune.io_templates.modeling_daprune import PREFIX, base_model_type, config_class_name

    cfg_path = folder / "config.json"
    cfg = json.loads(cfg_path.read_text())
    auto_map = {k: v for k, v in cfg.get("auto_map", {}).items() if not str(v).startswith(f"{_REMOTE_MODULE}.")}
    family = base_model_type(cfg.get("model_type"))
    if needs_remote_code(cfg):
        # its own model type (as DeciLM does): vanilla transformers refuses it at once, asking for remote code
        name = _remote_class(family)
        cfg["model_type"], cfg["architectures"] = PREFIX + family, [name]
        auto_map["AutoConfig"] = f"{_REMOTE_MODULE}.{config_class_name(family)}"
        auto_map["AutoModelForCausalLM"] = f"{_REMOTE_MODULE}.{name}"
        (folder / MODELING_FILE).write_text(modeling_template())
    else:
        if family != cfg.get("model_type"):  # a per-layer source pruned to uniform shapes: the family's own type
            from daprune.io_templates.modeling_daprune import FAMILIES

            cfg["model_type"], cfg["architectures"] = family, [FAMILIES[family][1]]
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


# -- streamed weights -------------------------------------------------------------------------------------
def _shard_name(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem (--work-dir elsewhere) or no hard links: copy
        shutil.copyfile(src, dst)


def write_streaming_output(store: StreamingStore, block_file: Callable[[int], Path], tmp: Path) -> None:
    """Write the weights of a streamed, pruned model into the (atomic temp) folder ``tmp``.

    ``block_file(i)`` is the work folder's shard of pruned block i. Shards: embedding, one per block,
    then everything else (final norm, an untied lm_head). Blocks lacking the zero biases that
    ``update_config`` made model-wide (FLAP compensation on some blocks) are rewritten with them.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, adapter, reader = store.adapter.model, store.adapter, store.reader
    n = adapter.n_layers
    total = n + 2
    expected = model.state_dict()  # meta tensors: names, pruned shapes, dtypes
    tied = tied_lm_head_key(model)
    emb_key = param_name(model, model.get_input_embeddings().weight)
    weight_map: dict[str, str] = {}
    meta = {"format": "pt"}

    save_file(reader.get_many([emb_key], store.dtype), str(tmp / _shard_name(1, total)), metadata=meta)
    weight_map[emb_key] = _shard_name(1, total)

    for i in range(n):
        src, dst = block_file(i), tmp / _shard_name(i + 2, total)
        pre = store.block_prefix(i)
        want = {k: v for k, v in expected.items() if k.startswith(pre)}
        with safe_open(str(src), framework="pt") as fh:
            have = set(fh.keys())
        missing = [k for k in want if k not in have]
        if missing:
            if not all(k.endswith(".bias") for k in missing):
                raise WeightsMismatchError(f"block {i} checkpoint lacks {missing[:3]}")
            tensors = load_file(str(src))
            for k in missing:
                tensors[k] = torch.zeros(want[k].shape, dtype=want[k].dtype)
            save_file({k: tensors[k] for k in want}, str(dst), metadata=meta)
        else:
            _link_or_copy(src, dst)
        for k in want:
            weight_map[k] = dst.name

    rest = [k for k in expected if not k.startswith(store.prefix + ".") and k not in (emb_key, tied)]
    save_file(reader.get_many(rest, store.dtype), str(tmp / _shard_name(total, total)), metadata=meta)
    weight_map.update({k: _shard_name(total, total) for k in rest})

    size = sum(v.numel() * v.element_size() for k, v in expected.items() if k != tied)
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(tmp)
