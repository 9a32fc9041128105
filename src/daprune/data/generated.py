"""Self-generated calibration kept across runs.

Generating text token by token is most of a data-free prune's time (Gemma-3-270M, 128 x 128 tokens: about
600 of 705 s on two cores), and it is deterministic: the same weights, seed, sampling settings, precision and
device write the same rows. ``daprune compare`` runs several rows on the same self-generated text, and a sweep
runs the same text at several sizes, so each set of rows is generated once and read back afterwards.

Entries live under ``<cache>/self-generated/`` (``--cache-dir`` / ``$DAPRUNE_CACHE``), one safetensors file per
key; the key holds everything that changes the text, including the torch and transformers versions (their
kernels and samplers). A file that is unreadable, of the wrong shape or written for another key is ignored and
overwritten: the cache can only save time, never change a result.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)


def store_for(source, dtype: str, device: str, cache: str | os.PathLike | None = None) -> GeneratedStore | None:
    """The store of a resolved model source (``models.loading.ModelSource``) at this precision and device type;
    None for a hub id, which nothing cheap identifies (a new revision may come down at any time)."""
    from daprune.checkpoint import source_fingerprint
    from daprune.models.loading import cache_dir

    if source is None or source.kind == "hub":
        return None
    # besides the weights, the tokenizer's special ids and generation_config.json's EOS (suppressed until the row is
    # full) shape what the model writes
    folder = Path(source.path)
    texts = {name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in _GENERATION_FILES
             if (folder / name).is_file()}
    key = {"source": source_fingerprint(dataclasses.asdict(source)), "files": texts, "dtype": dtype,
           "device": device}
    return GeneratedStore(cache_dir(cache) / "self-generated", key)


_GENERATION_FILES = ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


class GeneratedStore:
    """Self-generated calibration rows of one model (``model_key``: what identifies its weights and numerics)."""

    def __init__(self, root: Path, model_key: dict[str, Any]):
        import transformers

        self.root = Path(root)
        self.model_key = {**model_key, "torch": torch.__version__, "transformers": transformers.__version__}

    def key(self, nsamples: int, seqlen: int, seed: int, sampling: dict[str, Any]) -> str:
        return json.dumps({"model": self.model_key, "nsamples": nsamples, "seqlen": seqlen, "seed": seed,
                           "sampling": sampling}, sort_keys=True)

    def path(self, key: str) -> Path:
        return self.root / f"{hashlib.sha256(key.encode()).hexdigest()[:32]}.safetensors"

    def load(self, nsamples: int, seqlen: int, seed: int, sampling: dict[str, Any]) -> torch.Tensor | None:
        key = self.key(nsamples, seqlen, seed, sampling)
        f = self.path(key)
        if not f.is_file():
            return None
        try:
            from safetensors import safe_open

            with safe_open(str(f), framework="pt") as fh:
                if (fh.metadata() or {}).get("key") != key:
                    return None
                ids = fh.get_tensor("ids")
        except Exception as exc:  # a damaged entry costs a regeneration, nothing else
            log.warning("ignoring the unreadable self-generated calibration cache entry %s (%s)", f, exc)
            return None
        return ids if ids.shape == (nsamples, seqlen) and ids.dtype == torch.long else None

    def save(self, ids: torch.Tensor, nsamples: int, seqlen: int, seed: int, sampling: dict[str, Any]) -> Path | None:
        from daprune.atomic import atomic_save_tensors

        key = self.key(nsamples, seqlen, seed, sampling)
        f = self.path(key)
        try:
            f.parent.mkdir(parents=True, exist_ok=True)
            atomic_save_tensors(f, {"ids": ids.to(torch.long)}, metadata={"format": "pt", "key": key})
        except OSError as exc:  # a read-only or full cache must not fail the prune that generated the rows
            log.warning("could not keep the self-generated calibration in %s (%s)", f, exc)
            return None
        return f
