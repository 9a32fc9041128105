"""Writing an output folder: the pruned model's weights, config, remote code, tokenizer and report.json.

Why one module: a folder is written the same way whether the pruned model is in memory or only on disk
(streaming), so both go through :func:`write_output`; only the weights differ
(:func:`model_weights`: ``save_pretrained``; :func:`streamed_weights`: the work folder's block shards).

* An output folder only ever appears complete: everything is written into a hidden temp folder beside
  it and renamed into place at the end (:func:`atomic_dir`); a path that exists or cannot be written is
  refused before any work (:func:`check_output`, :func:`probe_writable`).
* Weights are written in the save dtype (the source checkpoint's own precision unless ``--save-dtype``
  says otherwise) and sharded by size like ``save_pretrained`` (``--max-shard-size``, default 5GB: one
  ``model.safetensors`` for a small model, ``model-0000k-of-0000N.safetensors`` + index otherwise).
* Streamed weights (:func:`write_streaming_output`): the embedding, the work folder's block shards and the
  final norm / lm_head, regrouped into size-bounded shards (one output shard in memory at a time), an
  index, config and generation config. Tied embeddings write no ``lm_head.weight``, like ``save_pretrained``.
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

from daprune.atomic import atomic_write_bytes, owner_tag, remove_stale_siblings, usual_modes
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
        usual_modes(tmp)
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


def write_output(out: str | os.PathLike, weights: Callable[[Path], dict | None], tokenizer, report: dict, *,
                 overwrite: bool = False, extra: Callable[[Path], None] | None = None) -> Path:
    """Write ``out`` atomically: ``weights(tmp)`` (see :func:`model_weights`, :func:`streamed_weights`), the
    remote code where needed, the tokenizer (if any), report.json, then ``extra(tmp)`` for added files.

    What the weights writer reports (dtype, shards, bytes: counted from the files written) goes into
    report.json as ``output``."""
    with atomic_dir(out, overwrite) as tmp:
        written = weights(tmp)
        if written:
            report["output"] = {**written, **_count_shards(tmp)}
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


def model_weights(model, dtype: torch.dtype | None = None, max_shard_size: str | int = "5GB"
                  ) -> Callable[[Path], dict]:
    """Weights of a model in memory, written by ``save_pretrained`` in ``dtype`` (None: as they are), in shards
    of at most ``max_shard_size``; its config is brought up to date now. The model itself keeps its dtype."""
    _sync_config(model)

    def write(tmp: Path) -> dict:
        target = dtype or next(model.parameters()).dtype
        state = None
        if any(p.is_floating_point() and p.dtype != target for p in model.parameters()):
            cast: dict[int, torch.Tensor] = {}  # tied tensors stay one tensor (save_pretrained drops the copy)
            state = {k: cast.setdefault(v.data_ptr(), v.to(target)) if v.is_floating_point() else v
                     for k, v in model.state_dict().items()}
        model.save_pretrained(tmp, state_dict=state, max_shard_size=max_shard_size)
        if not any(tmp.glob("*.safetensors")):
            raise OutputError("the model was not written as safetensors")
        name = str(target).removeprefix("torch.")
        cfg = json.loads((tmp / "config.json").read_text())
        cfg["dtype"] = name  # save_pretrained states the parameters' dtype; the files hold ``target``
        write_json(tmp / "config.json", cfg)
        return {"dtype": name, "max_shard_size": max_shard_size}

    return write


def streamed_weights(store: StreamingStore, block_file: Callable[[int], Path], dtype: torch.dtype | None = None,
                     max_shard_size: str | int = "5GB", replaced: dict[str, torch.Tensor] | None = None
                     ) -> Callable[[Path], dict]:
    """Weights of a streamed model: ``block_file(i)`` is the work folder's shard of pruned block i; ``replaced``:
    tensors outside the blocks written instead of the source's (the final norm carrying ``--logit-scale``)."""
    return lambda tmp: write_streaming_output(store, block_file, tmp, dtype, max_shard_size, replaced)


def _count_shards(folder: Path) -> dict:
    """What was really written: the safetensors files and their bytes."""
    files = sorted(folder.glob("*.safetensors"))
    return {"shards": len(files), "bytes": sum(f.stat().st_size for f in files)}


def resolve_save_dtype(setting: str, source: str | None) -> torch.dtype:
    """The dtype weights are written in: ``setting``, or for "source" the checkpoint's own (fp64 as fp32)."""
    from daprune.models.loading import DTYPES

    name = source if setting == "source" else setting
    name = {"float64": "float32", None: "float32"}.get(name, name)
    return DTYPES[name]


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


def write_streaming_output(store: StreamingStore, block_file: Callable[[int], Path], tmp: Path,
                           dtype: torch.dtype | None = None, max_shard_size: str | int = "5GB",
                           replaced: dict[str, torch.Tensor] | None = None) -> dict:
    """Write the weights of a streamed, pruned model into the (atomic temp) folder ``tmp``.

    ``block_file(i)`` is the work folder's shard of pruned block i. Tensors go out in model order (embedding,
    blocks, final norm and an untied lm_head), in ``dtype`` (None: the store's), grouped into shards of at
    most ``max_shard_size`` (a block is never split; a larger block gets a shard of its own), so at most one
    output shard is in memory. Blocks lacking the zero biases that ``update_config`` made model-wide (FLAP
    compensation on some blocks) get them here.
    """
    from safetensors.torch import load_file, save_file

    from daprune.config import parse_size

    model, adapter, reader = store.adapter.model, store.adapter, store.reader
    dtype = dtype or store.dtype
    limit = parse_size(max_shard_size)
    expected = model.state_dict()  # meta tensors: names, pruned shapes, dtypes
    tied = tied_lm_head_key(model)
    emb_key = param_name(model, model.get_input_embeddings().weight)
    rest = [k for k in expected if not k.startswith(store.prefix + ".") and k not in (emb_key, tied)]
    groups: list[tuple[str | int, list[str]]] = [("embedding", [emb_key])]
    groups += [(i, [k for k in expected if k.startswith(store.block_prefix(i))]) for i in range(adapter.n_layers)]
    groups.append(("rest", rest))

    def nbytes(keys: list[str]) -> int:
        return sum(expected[k].numel() * (dtype.itemsize if expected[k].is_floating_point()
                                          else expected[k].element_size()) for k in keys)

    shards: list[list[tuple[str | int, list[str]]]] = [[]]
    size = 0
    for group in groups:
        b = nbytes(group[1])
        if shards[-1] and size + b > limit:
            shards.append([])
            size = 0
        shards[-1].append(group)
        size += b

    def load(what: str | int, keys: list[str]) -> dict[str, torch.Tensor]:
        if not isinstance(what, int):  # through the compute dtype, exactly as the in-memory model holds them
            own = [k for k in keys if k not in (replaced or {})]
            tensors = {**reader.get_many(own, store.dtype), **{k: replaced[k] for k in keys if k not in own}}
            return {k: t.to(dtype) if t.is_floating_point() else t for k, t in tensors.items()}
        tensors = load_file(str(block_file(what)))
        missing = [k for k in keys if k not in tensors]
        if not all(k.endswith(".bias") for k in missing):
            raise WeightsMismatchError(f"block {what} checkpoint lacks {missing[:3]}")
        for k in missing:
            tensors[k] = torch.zeros(expected[k].shape, dtype=dtype)
        return {k: tensors[k].to(dtype) if tensors[k].is_floating_point() else tensors[k] for k in keys}

    meta = {"format": "pt"}
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        name = "model.safetensors" if len(shards) == 1 else _shard_name(k, len(shards))
        tensors: dict[str, torch.Tensor] = {}
        for what, keys in shard:
            tensors.update(load(what, keys))
        save_file(tensors, str(tmp / name), metadata=meta)
        weight_map.update({key: name for key in tensors})
        del tensors
    if len(shards) > 1:
        index = {"metadata": {"total_size": nbytes([k for k in expected if k != tied])},
                 "weight_map": dict(sorted(weight_map.items()))}
        (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    old = getattr(model.config, "dtype", None)
    model.config.dtype = dtype
    model.config.architectures = [type(model).__name__]
    try:
        model.config.save_pretrained(tmp)
    finally:
        model.config.dtype = old
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(tmp)
    return {"dtype": str(dtype).removeprefix("torch."), "max_shard_size": max_shard_size}
