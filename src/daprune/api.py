"""The Python API: ``daprune.prune(...)`` returns the pruned model and its report."""

from __future__ import annotations

import dataclasses
import platform
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from daprune.config import PruneConfig, parse_layers
from daprune.errors import ConfigError


@dataclass
class PruneResult:
    model: torch.nn.Module
    tokenizer: object
    report: dict
    out: Path | None = None


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prune(config: PruneConfig | None = None, *, model=None, tokenizer=None, out: str | None = None,
          overwrite: bool = False, data_dir: str | None = None, cache: str | None = None,
          progress: bool = True, **settings) -> PruneResult:
    """Prune a causal LM in one shot and (optionally) write it to ``out``.

    Pass a :class:`PruneConfig` or its fields as keyword arguments. ``model``/``tokenizer`` may be
    given directly (already loaded); otherwise ``config.model`` is resolved (default: SmolLM2-135M).
    All checks on user input run before the model is loaded, and ``out`` is written atomically.
    """
    from daprune.data.calibration import calibration_tokens
    from daprune.io import check_output, save_pruned
    from daprune.models.adapter import get_adapter
    from daprune.models.loading import DTYPES, load_model
    from daprune.pipeline import run_pipeline

    cfg = dataclasses.replace(config or PruneConfig(), **settings)
    cfg.validate()
    if out is not None:
        check_output(out, overwrite)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    source = None
    if model is None:
        model, tokenizer, source = load_model(cfg.model, dtype=cfg.dtype, device=cfg.device, cache=cache)
    else:
        model.to(DTYPES[cfg.dtype])
    model.eval()
    adapter = get_adapter(model)
    parse_layers(cfg.layers, adapter.n_layers)  # empty range -> ConfigError before any work
    timings["load_s"] = time.perf_counter() - t0

    seed_everything(cfg.seed)
    t1 = time.perf_counter()
    ids, calib_info = calibration_tokens(cfg.calibration, model, tokenizer, cfg.nsamples, cfg.seqlen, cfg.seed,
                                         data_dir=data_dir, self_gen=cfg.self_gen, progress=progress)
    timings["calibration_s"] = time.perf_counter() - t1

    grads = None
    if any("grads" in _needs(n) for n in (cfg.ffn_criterion, cfg.head_criterion)):
        from daprune.criteria.taylor import collect_gradients

        t2 = time.perf_counter()
        grads = collect_gradients(model, adapter, ids, batch_size=cfg.batch_size, progress=progress)
        timings["gradients_s"] = time.perf_counter() - t2

    seed_everything(cfg.seed)
    result = run_pipeline(adapter, ids, cfg, progress=progress, grads=grads)
    timings.update(result.timings)
    shapes = adapter.update_config()
    timings["total_s"] = time.perf_counter() - t0

    report = build_report(cfg, source, calib_info, result, shapes, timings)
    out_path = None
    if out is not None:
        out_path = save_pruned(model, tokenizer, out, report, overwrite=overwrite)
    return PruneResult(model, tokenizer, report, out_path)


def _needs(name: str) -> frozenset[str]:
    from daprune.criteria.base import get_criterion

    if name in ("similarity", "none"):
        return frozenset()
    try:
        return get_criterion(name).needs
    except ConfigError:
        return frozenset()


def build_report(cfg, source, calib_info, result, shapes, timings) -> dict:
    import transformers

    before, after = result.params_before, result.params_after
    layers = []
    for r in result.records:
        row = dataclasses.asdict(r)
        row.pop("kept_channel_idx")
        layers.append(row)
    return {
        "daprune_version": _version(),
        "settings": cfg.to_dict(),
        "model_source": dataclasses.asdict(source) if source is not None else None,
        "calibration": calib_info,
        "params": {
            "before": before,
            "after": after,
            "removed": before - after,
            "achieved_sparsity": (before - after) / before,
            "requested_sparsity": cfg.sparsity,
            "target_per_block": result.target_per_block,
        },
        "shapes": shapes,
        "layers": layers,
        "kept_channels": {r.index: r.kept_channel_idx for r in result.records if r.pruned},
        "timings": timings,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "threads": torch.get_num_threads()},
    }


def _version() -> str:
    from daprune import __version__

    return __version__
