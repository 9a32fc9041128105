"""The Python API: ``daprune.prune(...)`` returns the pruned model and its report.

Two execution modes share one block loop (:func:`daprune.pipeline.run_pipeline`):

* **streaming** (default when the source is a local safetensors folder, incl. the cached default model,
  and an output folder is given): blocks are read from disk one at a time, so memory does not grow
  with depth (:mod:`daprune.stores`);
* **in memory**: the whole model is loaded (hub ids, model objects passed in, mixture-of-experts
  checkpoints, ``--no-streaming``).

The passes that need gradients of the dense model (Taylor criteria, ``--error-weight fisher|kfac``) run in
either mode: streaming runs them block by block (:func:`daprune.backward.blockwise_next_token_backward`).

Whenever an output folder is written from a model source, a work folder beside it checkpoints every
block, and those gradient pre-passes, so an interrupted run resumes where it stopped without redoing them
(:mod:`daprune.checkpoint`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import functools
import gc
import json
import logging
import os
import platform
import random
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import numpy as np
import torch

from daprune.config import PruneConfig
from daprune.errors import ConfigError, DapruneError, NumericalError, TokenizerError

log = logging.getLogger(__name__)

RECOVERY_SEED_OFFSET = 7919  # seed of the re-fit's extra calibration samples: seed + this
HELDOUT_SEED_OFFSET = 104729  # seed of the held-out calibration samples (--heldout-nsamples): seed + this


class PruneResult:
    """The pruned model, its tokenizer and report, and the output folder if one was written.

    In streaming mode the pruned model only exists on disk; ``model`` then loads it from ``out`` on first
    access (so a caller that only wanted the folder never pays for loading it).
    """

    def __init__(self, model: torch.nn.Module | None, tokenizer: object, report: dict, out: Path | None = None):
        self._model = model
        self.tokenizer = tokenizer
        self.report = report
        self.out = out

    @property
    def model(self) -> torch.nn.Module | None:
        if self._model is None and self.out is not None:
            from daprune.loader import load_pruned

            dtype = self.report.get("settings", {}).get("dtype", "float32")
            self._model, _ = load_pruned(self.out, dtype=dtype)
        return self._model

    @model.setter
    def model(self, value: torch.nn.Module | None) -> None:
        self._model = value


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def prune(config: PruneConfig | None = None, *, model=None, tokenizer=None, out: str | None = None,
          overwrite: bool = False, data_dir: str | None = None, cache: str | None = None,
          progress: bool = True, streaming: bool | None = None, resume: bool = True,
          work_dir: str | os.PathLike | None = None, activations: str = "device",
          extra: Callable[[Path], None] | None = None, generated=None, **settings) -> PruneResult:
    """Prune a causal LM in one shot and (optionally) write it to ``out``.

    Pass a :class:`PruneConfig` or its fields as keyword arguments; ``preset="quality"`` starts the fields from
    that preset (:mod:`daprune.presets`) and the other keywords are set over it. ``model``/``tokenizer`` may be
    given directly (already loaded); otherwise ``config.model`` is resolved (default: SmolLM2-135M). A
    string or path passed as ``model`` is taken as that source.
    All checks on user input run before the model is loaded, and ``out`` is written atomically.

    Execution (none of these change the result): ``streaming`` (None: automatic, see the module doc),
    ``resume`` (continue an interrupted run found in the work folder; False discards it),
    ``work_dir`` (default ``OUT.daprune-work``), ``activations`` (``device`` | ``cpu`` | ``disk``: where the
    two activation streams live), ``extra(tmp)`` (adds files to the output folder before it appears),
    ``generated`` (a ``data.generated.GeneratedStore`` for self-generated rows of a model passed in memory; a
    resolved source gets its own).
    """
    from daprune.activations import ACTIVATION_MODES
    from daprune.checkpoint import WorkDir, default_work_dir, source_fingerprint
    from daprune.devices import resolve_device, warn_slow_half_precision
    from daprune.models.loading import resolve_source
    from daprune.output import check_output, probe_writable
    from daprune.weights import WeightsReader, count_parameters

    if isinstance(model, (str, os.PathLike)):  # a source (folder, .gguf, hub id), not a loaded model
        settings["model"], model = str(model), None
    preset = settings.pop("preset", None)
    if preset is not None and config is not None:
        raise ConfigError("preset= builds the settings, and a config was passed too: pass one of them (a config "
                          "from a preset: PruneConfig.from_preset(name, ...))")
    base = PruneConfig.from_preset(preset) if preset is not None else config or PruneConfig()
    cfg = dataclasses.replace(base, **settings)
    cfg.validate()
    if cfg.allocation_from is not None:  # a report for another problem is refused now, not after calibration
        from daprune.allocation_reuse import read_allocation

        read_allocation(cfg.allocation_from, cfg.to_dict(), cfg.layers_spec())
    if activations not in ACTIVATION_MODES:
        raise ConfigError(f"--activations must be one of {', '.join(ACTIVATION_MODES)}, got {activations!r}")
    if out is not None:
        check_output(out, overwrite)
        probe_writable(out)
    device = resolve_device(cfg.device)
    warn_slow_half_precision(cfg.dtype, str(device))
    t0 = time.perf_counter()

    source = reader = None
    if model is None:
        source = resolve_source(cfg.model, cache)
    model_config = check_model_config(cfg, source, model)  # a sane config, --seqlen within its context
    if source is not None and source.kind != "hub":
        check_index(Path(source.path))
        reader = WeightsReader(source.path)  # headers only: corrupt/truncated shards fail here
        check_weight_dtypes(reader)
        reader = reader if reader.available else None
    use_streaming = _choose_streaming(streaming, model is not None, out, reader, model_config)

    work = None
    if out is not None and source is not None:
        work = WorkDir(work_dir or default_work_dir(out))
    resources = check_resources(cfg, model_config, use_streaming, activations, device, out,
                                work.path if work is not None else None)
    run = _Run(cfg, device, source, reader, work, activations, work_dir, progress, data_dir, cache)
    run.generated = generated
    # the checkpoint's own precision, for --save-dtype source (a passed model: its dtype before any cast)
    run.source_dtype = (reader.floating_dtype() if reader is not None else
                        str(next(model.parameters()).dtype).removeprefix("torch.") if model is not None else
                        str(getattr(model_config, "dtype", None) or "float32").removeprefix("torch."))
    run.timings["resolve_s"] = time.perf_counter() - t0
    with _hub_progress_bars(progress):
        if use_streaming:
            run.prepare_streaming()
        else:
            run.prepare_resident(model, tokenizer)
    tokenizer = run.tokenizer
    if work is not None:  # after every cheap check; a foreign work folder is refused, never deleted
        identity = {"settings": {**cfg.to_dict(), "device": str(device)},
                    "source": source_fingerprint(dataclasses.asdict(source)), "daprune": _version()}
        work.open(identity, resume=resume)
    try:
        with _disk_full_is_an_error(out, work, resources, "the work folder"):
            result = run.execute()
        shapes = run.adapter.update_config()
        # counted after update_config: FLAP's zero biases made model-wide there are written, so they count
        result.params_after = count_parameters(run.model)
        run.timings["total_s"] = time.perf_counter() - t0
        report = build_report(cfg, source, run.calib_info, result, shapes, run.timings)
        report["execution"] = {"device": str(device), "streaming": use_streaming, "activations": activations,
                               "resumed_from_block": work.resumed_from if work is not None else None,
                               "reused_prepasses": run.reused_prepasses}
        report["resources"] = resources
        with _disk_full_is_an_error(out, work, resources, "the output folder"):
            out_path = run.write(out, overwrite, report, extra) if out is not None else None
    except DapruneError as exc:
        if work is not None and not exc.keeps_work:
            work.remove()  # a deterministic input problem: resuming would fail the same way
        if isinstance(exc, NumericalError):  # say what the user can check, not only where it showed
            raise NumericalError(f"{exc}: the model's weights hold NaN or inf, or values overflow --dtype "
                                 f"{cfg.dtype}") from exc
        raise
    finally:
        run.cleanup()
    if work is not None:
        work.remove()
    return PruneResult(None if use_streaming else run.model, tokenizer, report, out_path)


def _choose_streaming(streaming: bool | None, model_given: bool, out, reader, model_config=None) -> bool:
    """Stream when possible and not turned off; ``--streaming`` where it is impossible is an error."""
    from daprune.models.adapter import family_of
    from daprune.models.moe import MoEAdapter

    reasons = []
    if family_of(model_config) in MoEAdapter.model_types:
        reasons.append("mixture-of-experts checkpoints store experts in another layout than the model's fused "
                       "3-D parameters (transformers converts them while loading the whole model)")
    if model_given:
        reasons.append("a loaded model object was passed")
    if out is None:
        reasons.append("no output folder is given (streaming writes the pruned blocks there)")
    if reader is None and not model_given:
        reasons.append("the model source has no local safetensors weights")
    if streaming is None:
        if reasons and not model_given and out is not None:
            log.info("not streaming: %s", "; ".join(reasons))
        return not reasons
    if streaming and reasons:
        raise ConfigError(f"--streaming is not possible here: {'; '.join(reasons)}; use --no-streaming")
    return bool(streaming)


class _Run:
    """State of one prune() call between its steps (kept out of prune() to keep that readable)."""

    def __init__(self, cfg: PruneConfig, device: torch.device, source, reader, work, activations: str,
                 work_dir, progress: bool, data_dir, cache):
        self.cfg, self.device, self.source, self.reader, self.work = cfg, device, source, reader, work
        self.activations, self.work_dir, self.progress = activations, work_dir, progress
        self.data_dir, self.cache = data_dir, cache
        self.timings: dict[str, float] = {}
        self.model = self.tokenizer = self.adapter = self.store = None
        self.calib_info: dict = {}
        self.source_dtype: str | None = None
        self.generated = None  # the caller's store of self-generated rows (prune(generated=...))
        self.reused_prepasses: list[str] = []  # pre-passes read from an interrupted run's work folder
        self.output_tensors: dict[str, torch.Tensor] = {}  # a streamed run's final norm carrying --logit-scale
        self._scratch: Path | None = None

    # -- loading -------------------------------------------------------------------------------------------
    def prepare_streaming(self) -> None:
        from daprune.devices import plan_placement
        from daprune.fit_checks import check_criteria_fit
        from daprune.loader import build_skeleton, load_tokenizer
        from daprune.models.adapter import get_adapter
        from daprune.models.loading import DTYPES
        from daprune.stores import StreamingStore

        t = time.perf_counter()
        dtype = DTYPES[self.cfg.dtype]
        self.model = build_skeleton(self.source.path, dtype)
        self.adapter = get_adapter(self.model)  # unsupported architecture: refused before any weight is read
        check_criteria_fit(self.adapter, self.cfg)
        self.reader.check_against(self.model)
        self.cfg.block_range(self.adapter.n_layers)
        self.tokenizer = load_tokenizer(Path(self.source.path))
        placement = plan_placement(self.cfg.device, self.adapter.layers()[0], dtype)
        self.store = StreamingStore(self.adapter, self.reader, dtype, placement, self._activations(placement.device))
        self.timings["load_s"] = time.perf_counter() - t

    def prepare_resident(self, model, tokenizer) -> None:
        from daprune.fit_checks import check_criteria_fit
        from daprune.loader import build_skeleton
        from daprune.models.adapter import get_adapter
        from daprune.models.checkpoint_keys import converts_tensors
        from daprune.models.loading import DTYPES, load_model
        from daprune.stores import ResidentStore

        t = time.perf_counter()
        if model is None:
            if self.reader is not None:  # fail on missing/mis-shaped tensors instead of random-initialising them
                skeleton = build_skeleton(self.source.path, DTYPES[self.cfg.dtype])
                if not converts_tensors(skeleton):  # else: checked after from_pretrained's conversions
                    self.reader.check_against(skeleton)
            model, tokenizer, self.source = load_model(self.cfg.model, dtype=self.cfg.dtype, device=str(self.device),
                                                       tokenizer_required=False,
                                                       cache=self.cache)
        else:
            model.to(DTYPES[self.cfg.dtype])
        model.eval()
        self.model, self.tokenizer = model, tokenizer
        self.adapter = get_adapter(model)
        check_criteria_fit(self.adapter, self.cfg)
        self.cfg.block_range(self.adapter.n_layers)  # empty range -> ConfigError before any work
        dev = next(model.parameters()).device
        self.store = ResidentStore(self.adapter, self._activations(dev))
        self.timings["load_s"] = time.perf_counter() - t

    def _activations(self, device: torch.device):
        from daprune.activations import Activations

        folder = None
        if self.activations == "disk":
            if self.work is not None:
                folder = self.work.act
            elif self.work_dir is not None:
                import tempfile

                Path(self.work_dir).mkdir(parents=True, exist_ok=True)
                self._scratch = Path(tempfile.mkdtemp(prefix="daprune-act-", dir=self.work_dir))
                folder = self._scratch
        return Activations(self.activations, device, folder)

    # -- running -------------------------------------------------------------------------------------------
    def _generated_store(self):
        """Where this model's self-generated rows are kept across runs: the caller's store for a model passed in
        memory (none if it gave none), else the source's."""
        from daprune.data.generated import store_for

        if self.generated is not None or self.source is None:
            return self.generated
        return store_for(self.source, self.cfg.dtype, self.device.type, self.cache)

    def calibration(self) -> torch.Tensor:
        from daprune.checkpoint import ids_digest
        from daprune.data.calibration import GENERATED_KINDS, calibration_parts, calibration_tokens

        cfg = self.cfg
        held_source = cfg.heldout_calibration or cfg.calibration
        for source in dict.fromkeys((cfg.calibration, held_source)):
            check_tokenizer(self.tokenizer, source)
        parts = calibration_parts(cfg.calibration)
        generated = cfg.uses_self_generation()
        cached = self.work.cached_ids() if self.work is not None and generated else None
        if cached is not None:
            kind = "mixture" if len(parts) > 1 else GENERATED_KINDS.get(parts[0], "text")
            self.calib_info = {"source": cfg.calibration, "nsamples": cfg.nsamples, "seqlen": cfg.seqlen,
                               "seed": cfg.seed, "kind": kind, "reused_from_work_folder": True}
            if cfg.heldout_nsamples:
                self.calib_info["heldout"] = {"source": held_source, "nsamples": cfg.heldout_nsamples}
            if cfg.copy_rows:
                from daprune.data.copy_rows import record

                self.calib_info["copy_rows"] = record(cached.shape[0], cached.shape[1], cfg.copy_rows)
            self.calib_info["ids_sha256"] = ids_digest(cached)
            return cached
        gen_model = self.model
        if self.store.streaming and generated:
            # generation is autoregressive: it needs every block at once (loaded only if a row is not cached)
            gen_model = functools.cache(self._full_model)
        tok = self.tokenizer if self.tokenizer is not None else _SpecialIds(self.model)
        seed_everything(cfg.seed)
        store = self._generated_store() if generated else None
        ids, info = calibration_tokens(cfg.calibration, gen_model, tok, cfg.nsamples, cfg.seqlen, cfg.seed,
                                       data_dir=self.data_dir, self_gen=cfg.self_gen, progress=self.progress,
                                       generated=store)
        extra = (cfg.recovery_nsamples or 0) - cfg.nsamples
        if extra > 0:  # the re-fit's extra samples: their own seed, so the scoring samples stay as without them
            more, more_info = calibration_tokens(cfg.calibration, gen_model, tok, extra, cfg.seqlen,
                                                 cfg.seed + RECOVERY_SEED_OFFSET, data_dir=self.data_dir,
                                                 self_gen=cfg.self_gen, progress=self.progress, generated=store)
            ids = torch.cat([ids, more])
            info["recovery_extra"] = {"nsamples": extra, "seed": more_info["seed"],
                                      "used_for": "least-squares re-fit statistics only, not scores"}
        if cfg.heldout_nsamples:  # last rows: no statistic sees them, each block's error is measured on them
            held, held_info = calibration_tokens(held_source, gen_model, tok, cfg.heldout_nsamples, cfg.seqlen,
                                                 cfg.seed + HELDOUT_SEED_OFFSET, data_dir=self.data_dir,
                                                 self_gen=cfg.self_gen, progress=self.progress, generated=store)
            ids = torch.cat([ids, held])
            info["heldout"] = {"source": held_source, "nsamples": cfg.heldout_nsamples, "seed": held_info["seed"],
                               "used_for": "per-block error_heldout only, never a statistic"}
        if gen_model is not self.model:
            del gen_model
            gc.collect()
        if cfg.copy_rows:  # after every row is drawn, so the draws (and the generated cache) are those without it
            from daprune.data.copy_rows import copy_halves

            ids, info["copy_rows"] = copy_halves(ids, cfg.copy_rows, getattr(tok, "bos_token_id", None))
        if cfg.calibration == "self" and getattr(tok, "bos_token_id", None) is None:
            info.setdefault("sampling", {})["prompt"] = "1 uniform random token (the tokenizer has no BOS token)"
        vocab = self.model.config.vocab_size
        if ids.numel() and int(ids.max()) >= vocab:
            raise TokenizerError(f"the tokenizer produced token id {int(ids.max())} but the model's vocabulary has "
                                 f"{vocab} entries: tokenizer and model do not belong together")
        # the rows themselves, every one the prune read (scoring, re-fit, held-out): two reports with the same digest
        # calibrated on the same tokens, whatever made them (a regenerated cache, another machine)
        info["ids_sha256"] = ids_digest(ids)
        self.calib_info = info
        return ids

    def _full_model(self):
        from transformers import AutoModelForCausalLM

        from daprune.models.loading import DTYPES

        log.warning("self-generated calibration loads the whole model once (streaming keeps only one block "
                    "in memory afterwards)")
        m = AutoModelForCausalLM.from_pretrained(self.source.path, dtype=DTYPES[self.cfg.dtype])
        return m.to(self.device).eval()

    def execute(self):
        from daprune.pipeline import run_pipeline

        if self.cfg.logit_scale == "fit":  # a final norm that cannot carry a scale is refused before any work
            from daprune.logit_scale import scaled_tensors

            with self.store.outside_layers(head=True):
                scaled_tensors(self.adapter, 1.5)
        t = time.perf_counter()
        ids = self.calibration()
        if self.work is not None:
            self.work.set_ids(ids)
        self.timings["calibration_s"] = time.perf_counter() - t
        cfg = self.cfg
        grads = self.gradients(ids[: cfg.nsamples])
        fisher = self.loss_weights(ids[: cfg.fisher_nsamples or cfg.nsamples])
        token_grads = self.token_gradients(ids)
        seed_everything(cfg.seed)
        result = run_pipeline(self.adapter, ids, cfg, progress=self.progress, grads=grads, store=self.store,
                              work=self.work, heldout=cfg.heldout_nsamples, fisher=fisher, token_grads=token_grads)
        self.timings.update(result.timings)
        self.output_tensors = result.output_tensors
        return result

    def gradients(self, rows: torch.Tensor) -> Mapping[int, dict[str, torch.Tensor]] | None:
        """The Taylor criteria's weight gradients of the dense model (None when no criterion needs them).

        Kept in the work folder, one file per block (``gradients/``), and read back one block at a time, so the
        pipeline never holds every block's fp32 gradients (as large as the model); a resumed run reuses them.
        Streaming computes them block by block (:func:`~daprune.criteria.taylor.streamed_gradients`), writing each
        block's as it is done; in memory the whole-model pass computes them, then they go to the same files. With
        no work folder (a model passed in, no output) the whole-model pass's dict is used as it is.
        """
        from daprune.checkpoint import BlockFiles, save_block_tensors
        from daprune.criteria.taylor import collect_gradients, streamed_gradients

        cfg, work = self.cfg, self.work
        if not _needs_gradients(cfg):
            return None
        with self._prepass("gradients", "gradients_s") as reused:
            if work is None:
                return collect_gradients(self.model, self.adapter, rows, batch_size=cfg.batch_size,
                                         progress=self.progress)
            files = BlockFiles(functools.partial(work.prepass_file, "gradients"), range(self.adapter.n_layers))
            if reused:
                return files

            def keep(i: int, block_grads: dict[str, torch.Tensor]) -> None:
                save_block_tensors(work.prepass_file("gradients", i), {i: block_grads})

            if self.store.streaming:
                streamed_gradients(self.adapter, self.store, rows, keep, batch_size=cfg.batch_size,
                                   progress=self.progress)
            else:
                for i, block_grads in collect_gradients(self.model, self.adapter, rows, batch_size=cfg.batch_size,
                                                        progress=self.progress).items():
                    keep(i, block_grads)
            return files

    def loss_weights(self, rows: torch.Tensor) -> dict[int, dict[str, torch.Tensor]] | None:
        """``--error-weight fisher|kfac``'s per-block output weights of the dense model (None for uniform), kept in
        the work folder (``fisher/all.safetensors``) so that a resumed run reuses them."""
        from daprune.fisher import output_fisher, streamed_output_fisher

        cfg = self.cfg
        if cfg.error_weight == "uniform":
            return None
        full = cfg.error_weight == "kfac"

        def compute() -> dict[int, dict[str, torch.Tensor]]:
            if self.store.streaming:
                return streamed_output_fisher(self.adapter, self.store, rows, batch_size=cfg.batch_size,
                                              progress=self.progress, full=full)
            return output_fisher(self.model, self.adapter, rows, batch_size=cfg.batch_size, progress=self.progress,
                                 full=full)

        return self._one_file_prepass("fisher", "fisher_s", compute)

    def token_gradients(self, rows: torch.Tensor) -> dict[int, dict[str, torch.Tensor]] | None:
        """``--token-weight gradient``'s per-token weights over every stream row (re-fit and held-out rows too: each
        row's statistics or errors are weighted by its own tokens' gradients), kept in the work folder
        (``token-gradients/all.safetensors``) so that a resumed run reuses them; None for any other token weight."""
        from daprune.fisher import token_gradients

        cfg = self.cfg
        if cfg.token_weight != "gradient":
            return None
        streamed = self.store.streaming
        return self._one_file_prepass("token-gradients", "token_gradients_s", lambda: token_gradients(
            self.adapter, rows, batch_size=cfg.batch_size, progress=self.progress,
            model=None if streamed else self.model, store=self.store if streamed else None))

    def _one_file_prepass(self, name: str, timing: str, compute: Callable[[], dict[int, dict[str, torch.Tensor]]]
                          ) -> dict[int, dict[str, torch.Tensor]]:
        """A pre-pass kept in one work-folder file (``NAME/all.safetensors``): read back when the folder holds it,
        else computed and, with a work folder, written."""
        from daprune.checkpoint import load_block_tensors, save_block_tensors

        with self._prepass(name, timing) as reused:
            if reused:
                return load_block_tensors(self.work.prepass_file(name))
            out = compute()
            if self.work is not None:
                save_block_tensors(self.work.prepass_file(name), out)
            return out

    @contextlib.contextmanager
    def _prepass(self, name: str, timing: str) -> Iterator[bool]:
        """Around a pre-pass: yields whether the work folder holds it already (then it is read, not computed);
        on success marks it done there and records its seconds in ``timings[timing]`` and a reuse in
        ``reused_prepasses`` (the report's ``execution``)."""
        t = time.perf_counter()
        reused = self.work is not None and self.work.prepass_done(name)
        yield reused
        if reused:
            self.reused_prepasses.append(name)
            log.info("%s: reused from the work folder %s", name, self.work.path)
        elif self.work is not None:
            self.work.mark_prepass(name)
        self.timings[timing] = time.perf_counter() - t

    # -- writing -------------------------------------------------------------------------------------------
    def write(self, out, overwrite: bool, report: dict, extra) -> Path:
        from daprune.output import model_weights, resolve_save_dtype, streamed_weights, write_output

        dtype = resolve_save_dtype(self.cfg.save_dtype, self.source_dtype)
        if self.store.streaming:
            weights = streamed_weights(self.store, self.work.block_file, dtype, self.cfg.max_shard_size,
                                       self.output_tensors)
        else:
            weights = model_weights(self.model, dtype, self.cfg.max_shard_size)
        return write_output(out, weights, self.tokenizer, report, overwrite=overwrite, extra=extra)

    def cleanup(self) -> None:
        if self._scratch is not None:
            import shutil

            shutil.rmtree(self._scratch, ignore_errors=True)


class _SpecialIds:
    """Stand-in tokenizer for self-generation from a folder without one: the config's special token ids."""

    def __init__(self, model):
        gen = getattr(model, "generation_config", None)

        def pick(name: str):
            value = getattr(gen, name, None) if gen is not None else None
            return value if value is not None else getattr(model.config, name, None)

        self.bos_token_id = pick("bos_token_id")
        eos = pick("eos_token_id")
        self.eos_token_id = eos[0] if isinstance(eos, list) and eos else eos
        self.pad_token_id = pick("pad_token_id")


def check_tokenizer(tokenizer, calibration: str) -> None:
    """Refuse calibration settings the tokenizer cannot serve; fall back where a fallback is sound.

    Random ids need no tokenizer. Self-generation only needs special ids: without BOS the prompt is one
    random token, without a pad token the EOS id pads, and without either no padding is needed (all
    samples have the same length). Text calibration is impossible without a tokenizer, and conversations
    (``chat``) without its chat template.
    """
    from daprune.data.calibration import calibration_parts

    parts = calibration_parts(calibration)
    if tokenizer is not None and "chat" in parts:
        from daprune.data.chat import chat_frame

        chat_frame(tokenizer)  # refuses a tokenizer without a chat template before anything is generated
    if tokenizer is not None or all(p in ("random", "self") for p in parts):
        return
    raise TokenizerError(f"calibration source {calibration!r} needs a tokenizer, but the model folder has none; "
                         "add the tokenizer files or use --calibration random (or self)")


# -- checks before any work (issue 13: every bad input a one-line error) ---------------------------------------
_CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")
_REQUIRED_DIMS = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
_OPTIONAL_DIMS = ("intermediate_size", "num_key_value_heads", "head_dim")


def check_model_config(cfg: PruneConfig, source, model) -> object:
    """The model's config, checked: supported family, positive whole-number sizes, heads that split into KV
    groups, and ``--seqlen`` within the context. Read from ``config.json`` alone, so a bad one is refused
    before any weight is read; transformers would otherwise fail later with a traceback (a negative
    vocabulary size) or not at all (a sequence longer than the position table)."""
    from daprune.errors import ModelSourceError, UnsupportedModelError
    from daprune.models.adapter import supported_model_types

    if model is not None:
        config, where = model.config, "the model's config"
    else:
        from transformers import AutoConfig

        from daprune.loader import register_auto_classes
        from daprune.models.adapter import family_of

        register_auto_classes()  # a daprune per-layer folder as the source: its own model type
        where = f"{source.origin}'s config.json" if source.kind != "hub" else f"the config of {source.origin}"
        try:
            config = AutoConfig.from_pretrained(source.path)
        except Exception as exc:
            raise ModelSourceError(f"cannot read the model config of {source.origin}: {exc}") from exc
        if family_of(config) not in supported_model_types():
            raise UnsupportedModelError(f"unsupported architecture {config.model_type!r}; daprune supports: "
                                        f"{', '.join(supported_model_types())}")
    for name in _REQUIRED_DIMS + _OPTIONAL_DIMS:
        value = getattr(config, name, None)
        if value is None and name in _OPTIONAL_DIMS:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ModelSourceError(f"{where}: {name} must be a positive whole number, got {value!r}")
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    if heads % kv:
        raise ModelSourceError(f"{where}: num_attention_heads ({heads}) is not a multiple of num_key_value_heads "
                               f"({kv})")
    check_context(cfg.seqlen, config, where)
    return config


def check_context(seqlen: int, config, where: str) -> None:
    """Refuse calibration sequences longer than the model's position table (it names the limit)."""
    for key in _CONTEXT_KEYS:
        limit = getattr(config, key, None)
        if isinstance(limit, int) and not isinstance(limit, bool) and limit > 0:
            if seqlen > limit:
                raise ConfigError(f"--seqlen {seqlen} is longer than the model's context: {where} has {key} = "
                                  f"{limit}; use --seqlen {limit} or less")
            return


def check_index(folder: Path) -> None:
    """An index that parses as JSON but whose ``weight_map`` is not names -> shard file names is corrupt.

    (WeightsReader reports unparsable ones; this shape check keeps a list or a number there from becoming a
    TypeError deep inside it.)"""
    from daprune.errors import CorruptWeightsError

    index = folder / "model.safetensors.index.json"
    try:
        data = json.loads(index.read_text()) if index.is_file() else None
    except (OSError, ValueError):
        return  # WeightsReader names the parse error
    if data is None:
        return
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) and v for v in weight_map.values()):
        raise CorruptWeightsError(f"{index} is not a valid safetensors index: 'weight_map' must map tensor names "
                                  "to shard file names")


def check_weight_dtypes(reader) -> None:
    """Weights and biases must be floating point: integer or boolean tensors are a quantized or broken
    checkpoint that the pruner's float matmuls would reject mid-run."""
    from safetensors import safe_open

    from daprune.errors import WeightsMismatchError

    bad = []
    for f in reader.files:
        with safe_open(str(f), framework="pt") as fh:
            names = fh.keys()  # safe_open handles are not iterable
            for key in names:
                dtype = fh.get_slice(key).get_dtype()
                if key.endswith((".weight", ".bias")) and not dtype.startswith(("F", "BF")):
                    bad.append(f"{key} is {dtype}")
    if bad:
        raise WeightsMismatchError(f"the weights in {reader.folder} are not floating point ({'; '.join(bad[:3])}"
                                   f"{'; ...' if len(bad) > 3 else ''}): daprune prunes float32/bfloat16/float16 "
                                   "weights; dequantize the model first")


def check_resources(cfg: PruneConfig, model_config, streaming: bool, activations: str, device: torch.device,
                    out, work_path: Path | None) -> dict:
    """Estimate the run's peak memory and disk use and refuse what cannot fit; the numbers go into the report.

    The gradient pre-passes (Taylor criteria, ``--error-weight fisher|kfac``) are counted with the rows they use.
    Only CPU memory is checked: with a GPU the streams and the block live in its memory, which
    ``plan_placement`` checks per block.
    """
    from daprune import resources as res

    dims = res.ModelDims.from_config(model_config)
    nsamples = max(cfg.nsamples, cfg.recovery_nsamples or 0) + cfg.heldout_nsamples  # every row in the streams
    on_cpu = device.type == "cpu" or activations == "cpu"
    fisher = cfg.error_weight != "uniform"
    # --token-weight gradient: one more pass, over every stream row, costing what a fisher pass on those rows does
    fisher_rows = max((cfg.fisher_nsamples or cfg.nsamples) if fisher else 0,
                      nsamples if cfg.token_weight == "gradient" else 0)
    passes = res.GradientPasses(taylor_rows=cfg.nsamples if _needs_gradients(cfg) else 0,
                                fisher_rows=fisher_rows,
                                kfac=cfg.error_weight == "kfac", work_folder=work_path is not None)
    est = res.estimate(dims, nsamples=nsamples, seqlen=cfg.seqlen, batch_size=cfg.batch_size, dtype=cfg.dtype,
                       sparsity=cfg.sparsity, streaming=streaming, activations=activations,
                       selection=cfg.ffn_selection(), gradients=passes)
    report: dict = {"estimate": est.to_dict(), "checked": {"memory": on_cpu, "disk": out is not None}}
    if on_cpu:
        available = res.available_memory()
        report["available_memory"] = available
        res.check_memory(est, available, res.free_disk(work_path)[1] if work_path is not None else None)
    if out is not None:
        report["disk"] = res.check_disk(est, out, work_path, linked=False)  # output shards are copies, not links
    return report


@contextlib.contextmanager
def _disk_full_is_an_error(out, work, resources: dict, what: str) -> Iterator[None]:
    """Turn "No space left on device" (OSError ENOSPC, or safetensors' own error with that text) into a
    one-line DiskFullError that says where, how much the output needs, and that the work folder is kept."""
    from daprune.errors import DiskFullError
    from daprune.resources import free_disk, human

    try:
        yield
    except DapruneError:
        raise
    except Exception as exc:
        if not (getattr(exc, "errno", None) == errno.ENOSPC or "No space left on device" in str(exc)):
            raise
        place = Path(getattr(exc, "filename", None) or (out if what == "the output folder" else work.path))
        at, free = free_disk(place)
        kept = (f"the work folder {work.path} is kept: free some space and run the same command again to resume"
                if work is not None else "nothing was kept")
        need = resources.get("estimate", {}).get("output")
        raise DiskFullError(f"no space left on device while writing {what} ({at} has {human(free)} free); the "
                            f"output needs about {human(need) if need else 'unknown'}; {kept}") from exc


@contextlib.contextmanager
def _hub_progress_bars(enabled: bool) -> Iterator[None]:
    """Without progress (``--quiet``) transformers' loading bars stay off too: stderr is for errors."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    if not enabled:
        hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was and not enabled:
            hf_logging.enable_progress_bar()


def _needs_gradients(cfg: PruneConfig) -> bool:
    """Whether a criterion of the run scores with weight gradients (the Taylor criteria): a pre-pass to run and
    to count."""
    return any("grads" in _needs(n) for n in (cfg.ffn_criterion, cfg.head_criterion))


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
            "sparsity_basis": cfg.sparsity_basis,
            "blocks_before": result.block_params_before,
            "blocks_after": result.block_params_after,
            "achieved_block_sparsity": (result.block_params_before - result.block_params_after)
            / max(result.block_params_before, 1),
            "target_per_block": result.target_per_block,
        },
        "shapes": shapes,
        "layout": result.layout or {"mode": cfg.layout},
        "allocation": result.allocation,
        "logit_scale": result.logit_scale,
        "layers": layers,
        "kept_channels": {r.index: r.kept_channel_idx for r in result.records if r.pruned},
        "timings": timings,
        "environment": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "python": platform.python_version(), "threads": torch.get_num_threads()},
    }


def _version() -> str:
    from daprune import __version__

    return __version__
