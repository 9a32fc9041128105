"""Command line: thin wrappers that parse arguments into settings and call the API."""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import signal
import sys
from collections.abc import Iterator
from pathlib import Path

from daprune.atomic import atomic_write_json
from daprune.config import (
    ERROR_WEIGHTS,
    FFN_CRITERIA,
    HEAD_CRITERIA,
    HEAD_SPLITS,
    HELDOUT_STRENGTHS,
    LAYOUTS,
    LOGIT_SCALES,
    RECOVERY_MODES,
    RECOVERY_TARGETS,
    SCHEDULES,
    SELECTIONS,
    SOURCES_HELP,
    SPARSITY_BASES,
    TOKEN_WEIGHTS,
    UNROUTED_EXPERTS,
    PruneConfig,
    self_gen_settings,
)
from daprune.data.text import check_corpora
from daprune.errors import ConfigError, DapruneError, Interrupted
from daprune.evaluation.zeroshot import TASKS_HELP
from daprune.presets import PRESETS, preset_settings

# Each module exposes add_parser(subparsers) -> {command_name: handler(args) -> exit code}.
PLUGINS = ("daprune.evaluation.compare", "daprune.evaluation.bench_cli", "daprune.export.cli")


def _prune_parser(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("prune", help="prune a model and write a smaller dense model")
    d = PruneConfig()
    p.add_argument("--out", required=True, help="output folder (written atomically)")
    p.add_argument("--model", default=None, help="HF folder, hub id or .gguf (default: embedded SmolLM2-135M)")
    p.add_argument("--preset", choices=tuple(PRESETS), default=None,
                   help="start from a measured row's settings; any setting given explicitly wins: "
                        + "; ".join(f"{k}: {v.summary} [{_flags(v.settings)}; measured on {v.measured}]"
                                    for k, v in PRESETS.items()).replace("%", "%%"))
    p.add_argument("--sparsity", type=float, default=d.sparsity, help="fraction of all parameters to remove")
    p.add_argument("--calibration", default=d.calibration,
                   help=f"{SOURCES_HELP}, or a mixture A+B (e.g. lambada+self: rows alternate between the sources)")
    p.add_argument("--nsamples", type=int, default=d.nsamples)
    p.add_argument("--seqlen", type=int, default=d.seqlen)
    p.add_argument("--self-temperature", type=float, default=None,
                   help=f"self-generated calibration: sampling temperature (default {d.self_gen['temperature']})")
    p.add_argument("--self-top-p", type=float, default=None,
                   help=f"self-generated calibration: nucleus mass (default {d.self_gen['top_p']}; 1 samples the "
                        "whole distribution)")
    p.add_argument("--recover", dest="recovery", action="store_const", const="paper",
                   help="layer-wise least-squares recovery before scoring (the paper's remedy)")
    p.add_argument("--no-recover", dest="recovery", action="store_const", const="none")
    p.add_argument("--recovery", dest="recovery", choices=RECOVERY_MODES, default=d.recovery,
                   help="none | paper (re-fit before scoring) | post (re-fit kept columns after) | both | heldout "
                        "(post, ridge toward the current weights at the strength --heldout-nsamples rows prefer, no "
                        "re-fit where none helps them)")
    p.add_argument("--recovery-nsamples", type=int, default=d.recovery_nsamples,
                   help="calibration samples for the re-fit's least squares: the --nsamples scoring samples plus "
                        "extra ones (default: the scoring samples only; the re-fit overfits with few tokens)")
    p.add_argument("--recovery-damp", type=float, default=d.recovery_damp)
    p.add_argument("--heldout-nsamples", type=int, default=d.heldout_nsamples,
                   help="extra calibration samples no statistic sees; report.json gives each block's error on them "
                        "(error_heldout), which shows a re-fit's overfit (default 0: none)")
    p.add_argument("--heldout-calibration", default=d.heldout_calibration, metavar="SOURCE",
                   help="source of the --heldout-nsamples rows, as --calibration (default: the calibration's). "
                        "Other text than the calibration's (e.g. self with lambada) makes --recovery heldout choose "
                        "its re-fits on that text (measured: docs/quality.md)")
    p.add_argument("--heldout-strength", choices=HELDOUT_STRENGTHS, default=d.heldout_strength,
                   help="--recovery heldout: one ridge strength per re-fitted linear, chosen by its held-out error "
                        "summed over its outputs (shared), or one per output row, each by its own held-out error, "
                        "no re-fit for a row none helps (per-output; not through a post-FFN norm with "
                        "--recovery-target block, which couples the rows)")
    p.add_argument("--recovery-prior", choices=("zero", "original"), default=d.recovery_prior,
                   help="what the re-fit's ridge pulls toward (default: zero, the paper's; original under "
                        "--recovery heldout)")
    p.add_argument("--recovery-inputs", action=argparse.BooleanOptionalAction, default=d.recovery_inputs,
                   help="with --recovery post|heldout, also re-fit q/k/v and gate/up to their dense outputs on the "
                        "pruned stream (the paper's remedy for the input linears), under the same ridge rules: under "
                        "heldout each linear keeps its weights unless a strength lowers its held-out error")
    p.add_argument("--logit-scale", choices=LOGIT_SCALES, default=d.logit_scale,
                   help="fit: after the last block, multiply the logits by the one scale that brings the output "
                        "distribution closest (KL) to the dense model's on calibration rows, kept only if the "
                        "held-out rows agree; written into the final norm, so the model stays the family's own "
                        "(pruned models come out over-confident: docs/quality.md). Default none")
    p.add_argument("--copy-rows", type=float, default=d.copy_rows, metavar="FRACTION",
                   help="this fraction of the calibration rows repeat their first half as their second, so the "
                        "allocation and the fits see the model copy from its context, which natural text seldom "
                        "asks of a short row (docs/quality.md). Default 0")
    p.add_argument("--recovery-target", choices=RECOVERY_TARGETS, default=d.recovery_target,
                   help="what a re-fitted down_proj matches: linear (the dense down_proj's output, the paper's) or "
                        "block (the dense block's output, so the re-fit also corrects what earlier pruned blocks "
                        "and this block's heads changed in the residual stream; exact where the FFN output is added "
                        "to the residual as it is, a damped Gauss-Newton step through Gemma-2/3's post-FFN norm; "
                        "measured to help SmolLM2 at 16 samples and not Gemma-3: docs/quality.md)")
    p.add_argument("--layers", default=d.layers,
                   help="block range START:STOP (default 4:-2 as in the paper; every block under --schedule "
                        "sensitivity)")
    p.add_argument("--ffn-criterion", choices=FFN_CRITERIA, default=d.ffn_criterion)
    p.add_argument("--head-criterion", choices=HEAD_CRITERIA, default=d.head_criterion)
    p.add_argument("--schedule", choices=SCHEDULES, default=d.schedule,
                   help="uniform: the same share per block (paper); adaptive: FLAP's global z-score ranking; "
                        "sensitivity: each block's share from its measured effect on the output distribution "
                        "(KL of the model pruned at that block alone, at a few sizes); owl: shares from each "
                        "block's fraction of outlier weights (OWL)")
    p.add_argument("--sensitivity-nsamples", type=int, default=d.sensitivity_nsamples,
                   help="--schedule sensitivity: calibration rows the KL is measured on (default 4)")
    p.add_argument("--sensitivity-copy-rows", type=int, default=d.sensitivity_copy_rows, metavar="N",
                   help="--schedule sensitivity: N more rows in the allocation's KL only, scoring rows whose second "
                        "half repeats their first, so a block whose pruning breaks copying from the context is "
                        "priced; no statistic or fit reads them (unlike --copy-rows). Default 0")
    p.add_argument("--sensitivity-sizes", default=d.sensitivity_sizes, metavar="M1,M2,...",
                   help="--schedule sensitivity: the sizes each block is pruned at to measure its cost, as multiples "
                        "of the average share (default 0.5,1,1.5,2,3); the allocation interpolates between them")
    p.add_argument("--sensitivity-refit", action=argparse.BooleanOptionalAction, default=d.sensitivity_refit,
                   help="--schedule sensitivity with --recovery post|heldout: price each trial block after the "
                        "o_proj / down_proj re-fit the pipeline gives it (not with OBS compensation alone)")
    p.add_argument("--refit-unpruned", action=argparse.BooleanOptionalAction, default=d.refit_unpruned,
                   help="with a --recovery: give the blocks left whole after the first pruned block (outside "
                        "--layers, or a zero share under --schedule sensitivity|owl) the same re-fits toward the "
                        "dense model's outputs, so that they stop passing on the drift of the pruned ones")
    p.add_argument("--allocation-from", default=d.allocation_from, metavar="REPORT",
                   help="--schedule sensitivity|owl: take the per-block shares recorded in REPORT (a pruned folder or "
                        "its report.json) instead of measuring them; it must be for the same model, --sparsity, "
                        "basis and blocks (checked before any work). Saves the sensitivity pass when only what "
                        "follows it changes")
    p.add_argument("--allocation-search", type=int, default=d.allocation_search, metavar="GENERATIONS",
                   help="--schedule sensitivity: refine the allocation by this many generations of an evolutionary "
                        "search judged by the whole pruned model's KL from the dense one (the additive allocation "
                        "prices each block alone); keeps every trial block in memory")
    p.add_argument("--search-nsamples", type=int, default=d.search_nsamples,
                   help="--allocation-search: calibration rows its KL runs on (default 8)")
    p.add_argument("--owl-lambda", type=float, default=d.owl_lambda,
                   help="--schedule owl: block shares span the average +- this (default 0.08)")
    p.add_argument("--owl-threshold", type=float, default=d.owl_threshold,
                   help="--schedule owl: a weight is an outlier above this many times the block's mean Wanda "
                        "score (OWL's M, default 5)")
    p.add_argument("--error-weight", choices=ERROR_WEIGHTS, default=d.error_weight,
                   help="uniform: the output error of removed channels/heads counts every o_proj/down_proj output "
                        "dimension alike; fisher: each by the loss's sensitivity to it (E[g^2], one gradient pass "
                        "of the dense model over the calibration rows, block by block under --streaming); "
                        "kfac: by the whole matrix E[g g^T], so dimensions that act together count together")
    p.add_argument("--token-weight", choices=TOKEN_WEIGHTS, default=d.token_weight,
                   help="uniform: every calibration token's output error counts alike; residual: each token's by "
                        "1 / the mean square of the residual stream entering the block, which the next RMSNorm "
                        "divides it by (attention-sink tokens, with residual norms 100x the rest, then stop "
                        "dominating the statistics); first: the first position of each row carries a fixed share "
                        "of its weight (the BOS / attention-sink state every later token reads; --first-token-share); "
                        "gradient: each token's by ||g_t||^2, g_t the dense model's loss gradient at the block's "
                        "attention / FFN output (one more gradient pass over every calibration row)")
    p.add_argument("--first-token-share", type=float, default=d.first_token_share, metavar="F",
                   help="--token-weight first: the first position's share of each calibration row's weight "
                        "(default 0.2, chosen on held-out text; 0.5: as much as all the other positions together)")
    p.add_argument("--fisher-nsamples", type=int, default=d.fisher_nsamples, metavar="N",
                   help="--error-weight fisher|kfac: run the gradient pass on the first N scoring samples only "
                        "(default: all --nsamples; the pass is most of a 128-sample prune's time)")
    p.add_argument("--selection", choices=SELECTIONS, default=d.selection,
                   help="auto: with --ffn-criterion second-moment, obs with >= 4 calibration tokens per FFN channel, "
                        "else greedy; with any other criterion, score; "
                        "score: rank by the criterion; greedy: exact output error incl. correlations; "
                        "obs: greedy with least-squares compensation (greedy and obs need second-moment)")
    p.add_argument("--obs-damp", type=float, default=d.obs_damp)
    p.add_argument("--compensate-heads", action=argparse.BooleanOptionalAction, default=d.compensate_heads,
                   help="when a block loses heads, re-fit the kept o_proj columns by least squares to the full "
                        "attention output on the calibration rows (OBS compensation for heads; damping --obs-damp)")
    p.add_argument("--compensate-mean", action=argparse.BooleanOptionalAction, default=d.compensate_mean,
                   help="replace the removed FFN channels' and heads' mean contribution by a bias of down_proj / "
                        "o_proj, and choose and compensate them on the centred covariance (adds those biases "
                        "model-wide, as FLAP does)")
    p.add_argument("--head-split", choices=HEAD_SPLITS, default=d.head_split,
                   help="auto: heads vs channels by the output error estimated from second moments; measured: by "
                        "each candidate's real block output error (one trial forward per candidate); paper: same "
                        "ratio; ffn-only")
    p.add_argument("--tau", type=float, default=d.tau, help="JS divergence threshold (nats) for redundant heads")
    p.add_argument("--channel-multiple", type=int, default=d.channel_multiple,
                   help="kept FFN widths are multiples of this (default 16: measured, llama.cpp's f16 prompt "
                        "processing runs 1.5x faster on aligned widths for about +2%% perplexity; docs/layout.md)")
    p.add_argument("--kv-groups", action="store_true",
                   help="GQA models may also lose whole KV groups with their query heads "
                        "(multi-head models always may)")
    p.add_argument("--sparsity-basis", choices=SPARSITY_BASES, default=d.sparsity_basis,
                   help="--sparsity is a fraction of all parameters (total, the paper's convention) or of the decoder "
                        "blocks' parameters (blocks: for models whose embeddings dominate, e.g. Gemma-3-270M)")
    p.add_argument("--layout", choices=LAYOUTS, default=d.layout,
                   help="per-layer: each block in --layers gets its own split (config records per-block shapes; "
                        "loads with remote code or daprune.load); uniform: every block gets one shared split, "
                        "chosen by the least total estimated error, so the family's own config states it and "
                        "vanilla transformers, vLLM and llama.cpp load it")
    p.add_argument("--unrouted-experts", choices=UNROUTED_EXPERTS, default=d.unrouted_experts,
                   help="mixture-of-experts models: experts no calibration token is routed to keep the channels with "
                        "the largest weights (magnitude), those the layer's whole input favours (uniform), or the "
                        "layer's experts are not pruned at all (keep)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=("float32", "bfloat16", "float16"),
                   help="precision of the computation (statistics and solves); the weights are written in --save-dtype")
    p.add_argument("--save-dtype", default=d.save_dtype, choices=("source", "float32", "bfloat16", "float16"),
                   help="precision of the written weights (source: the model's own, e.g. a bf16 checkpoint stays bf16)")
    p.add_argument("--max-shard-size", default=d.max_shard_size,
                   help="largest safetensors shard of the output, as save_pretrained (default 5GB); streaming holds "
                        "one shard in memory while writing it")
    p.add_argument("--device", default=d.device,
                   help="cpu | cuda | cuda:N | auto (the GPU if one is visible); where each block is pruned")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.add_argument("--streaming", action=argparse.BooleanOptionalAction, default=None,
                   help="read, prune and write one block at a time from the safetensors files, so memory does not "
                        "grow with depth (default: on for local folders and the default model)")
    p.add_argument("--resume", action=argparse.BooleanOptionalAction, default=True,
                   help="continue an interrupted run from its work folder (--no-resume discards it and starts over)")
    p.add_argument("--work-dir", "--offload-dir", dest="work_dir", default=None,
                   help="work folder for checkpoints and disk activations (default: OUT.daprune-work)")
    p.add_argument("--activations", choices=("device", "cpu", "disk"), default="device",
                   help="where the two activation streams live: on the compute device, in CPU memory, or "
                        "memory-mapped files in the work folder")
    p.add_argument("--eval", dest="eval_ppl", default=None, metavar="CORPORA",
                   help="after pruning, measure perplexity on these corpora (e.g. lambada-heldout,wikitext2,ptb; "
                        "lambada-heldout / coqa-heldout / wiki-heldout: packaged passages calibration never reads)")
    p.add_argument("--max-windows", type=int, default=None, help="evenly spaced subset of eval windows")
    p.add_argument("--data-dir", default=None, help="evaluation data folder (default $DAPRUNE_DATA_DIR)")
    p.add_argument("--cache-dir", default=None, help="where converted models are cached ($DAPRUNE_CACHE)")
    p.add_argument("--gguf", default=None, metavar="FILE",
                   help="also write the pruned model as a GGUF for llama.cpp (f16; see daprune export)")
    p.add_argument("--quiet", action="store_true")
    p.set_defaults(recovery=d.recovery)
    return p


def _flags(settings: dict) -> str:
    """A preset's settings as the flags that set them (for --help and the README)."""
    def flag(k: str, v) -> str:
        name = "--" + k.replace("_", "-")
        return (name if v else f"--no-{name[2:]}") if isinstance(v, bool) else f"{name} {v}"

    return " ".join(flag(k, v) for k, v in settings.items())


def _eval_parser(sub) -> None:
    p = sub.add_parser("eval", help="perplexity and zero-shot accuracy of a model or pruned folder")
    p.add_argument("--model", default=None)
    p.add_argument("--ppl", default=None, metavar="CORPORA",
                   help="perplexity corpora, comma separated (wikitext2,ptb,ptb-test,lambada-heldout,"
                        "coqa-heldout,wiki-heldout); none unless given, so a --tasks run spends no time on perplexity")
    p.add_argument("--tasks", default="", help=TASKS_HELP)
    p.add_argument("--limit", type=int, default=None, help="documents per zero-shot task (the first ones)")
    p.add_argument("--stride", type=int, default=None, metavar="K",
                   help="every K-th document of each zero-shot task, spread over the whole set (the first documents "
                        "can be one part of it: HellaSwag's first 3,243 are all ActivityNet); not with --limit")
    p.add_argument("--request-cache", default=None, metavar="DIR",
                   help="keep lm-eval's scored requests here (one file per model): a stopped zero-shot run "
                   "continues where it was, and a --limit run's answers are reused by a later full run")
    p.add_argument("--max-windows", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", default=None, help="write results as JSON")
    p.add_argument("--quiet", action="store_true")


def prune_config(args: argparse.Namespace) -> PruneConfig:
    """The validated settings of a parsed ``prune`` command line (what report.json's ``settings`` records)."""
    fields = {k: getattr(args, k) for k in PruneConfig.__dataclass_fields__ if hasattr(args, k)}
    fields["self_gen"] = self_gen_settings(args.self_temperature, args.self_top_p)
    cfg = PruneConfig(**fields)
    cfg.validate()
    return cfg


def cmd_prune(args) -> int:
    # refuse bad settings, unreadable --eval corpora and an occupied --out before any work (the first two
    # before importing torch)
    cfg = prune_config(args)
    if args.max_windows is not None and not args.eval_ppl:
        raise ConfigError("--max-windows sets how much of the --eval corpora is read; pass --eval CORPORA too")
    from daprune.output import check_output

    check_output(args.out, args.overwrite)
    if args.eval_ppl:
        check_corpora(args.eval_ppl, args.data_dir, args.max_windows)
    if args.gguf:
        _check_gguf(cfg, args.cache_dir)
    from daprune.api import prune
    from daprune.report import plot_allocation, plot_layers, summary

    # the folder is written inside prune() (streaming writes it block by block); evaluation results are
    # added to its report.json afterwards
    def plot(tmp: Path) -> None:  # report.json is already in the folder being assembled
        report = json.loads((tmp / "report.json").read_text())
        plot_layers(report, tmp / "layers.png")
        if report.get("allocation"):
            plot_allocation(report["allocation"], tmp / "allocation.png")

    result = prune(cfg, data_dir=args.data_dir, cache=args.cache_dir, progress=not args.quiet, out=args.out,
                   overwrite=args.overwrite, streaming=args.streaming, resume=args.resume, work_dir=args.work_dir,
                   activations=args.activations, extra=plot)
    if args.eval_ppl:
        from daprune.evaluation.perplexity import evaluate
        from daprune.output import rewrite_report

        result.report["eval"] = evaluate(result.model, result.tokenizer, ppl=args.eval_ppl, data_dir=args.data_dir,
                                         max_windows=args.max_windows, progress=not args.quiet)
        rewrite_report(args.out, result.report)
    print(summary(result.report))
    print(f"\nwrote {args.out} (report.json, layers.png" + (", allocation.png)" if result.report.get("allocation")
                                                             else ")"))
    if args.gguf:  # from the written folder, exactly as `daprune export OUT --gguf FILE` would
        from daprune.export.cli import cmd_export

        cmd_export(argparse.Namespace(folder=args.out, gguf=args.gguf, outtype="f16", tokenizer_gguf=None))
    return 0


def _check_gguf(cfg: PruneConfig, cache_dir: str | None) -> None:
    """``--gguf``: refuse before pruning what the export after it must refuse: from the source model's config, its
    tokenizer as the prune will save it, and its biases. A hub model's config and tokenizer files are downloaded
    first and its weights only once those pass (the prune reads them from the same cache)."""
    import tempfile

    from transformers import AutoConfig

    from daprune.export.arch import ExportError, check_prune_export
    from daprune.export.gguf_writer import unread_nonzero_biases
    from daprune.export.tokenizer import source_gguf, tokenizer_fields
    from daprune.loader import load_tokenizer
    from daprune.models.loading import HUB_CONFIG_FILES, check_architecture, hub_files, hub_weight_files, resolve_source

    resolved = resolve_source(cfg.model, cache_dir)
    folder = hub_files(resolved.path, HUB_CONFIG_FILES) if resolved.kind == "hub" else Path(resolved.path)
    check_architecture(str(folder))
    config = AutoConfig.from_pretrained(folder)
    n = config.get_text_config().num_hidden_layers  # the config itself for text-only families
    uneven = (cfg.schedule != "uniform" or len(cfg.block_range(n)) < n  # per-block shares, or blocks left whole
              or (cfg.head_split in ("auto", "measured") and cfg.head_criterion != "none"))  # a split per block
    check_prune_export(config.to_dict(), cfg.layout, cfg.sparsity, uneven, cfg.output_bias_kinds())
    # pruning keeps the tokenizer and the embedding's rows; the export reads the tokenizer the prune saves, so a
    # rebuilt one is checked as saved (transformers may add a token when it loads one), a GGUF source's as copied
    vocab = int(config.get_text_config().vocab_size)
    way_out = ("; the export after pruning would refuse it: drop --gguf (and export afterwards with daprune export, "
               "which takes --tokenizer-gguf)")
    try:
        if source_gguf(folder) is not None:
            tokenizer_fields(folder, vocab)
        else:
            tok = load_tokenizer(folder)
            if tok is None:
                raise ExportError("the source has no tokenizer and no GGUF it came from, and the GGUF needs one")
            with tempfile.TemporaryDirectory() as tmp:
                tok.save_pretrained(tmp)
                tokenizer_fields(Path(tmp), vocab)
    except ExportError as exc:
        raise ExportError(f"--gguf: {exc}{way_out}") from None
    if resolved.kind == "hub":
        folder = hub_files(resolved.path, hub_weight_files(folder))
    # biases the source already carries (a compensated Qwen3 states its o_proj's by flag): pruning keeps them
    if refused := unread_nonzero_biases(folder):
        name, why = refused[0]
        raise ExportError(f"--gguf: the source's {name} is a nonzero bias, and {why}; pruning keeps it, so the "
                          "GGUF export would refuse the result: drop --gguf")


def cmd_eval(args) -> int:
    # every refusal before the model is loaded: nothing asked is a mistake, not a full default run
    if not args.ppl and not args.tasks:
        raise DapruneError("nothing to evaluate: pass --ppl CORPORA (e.g. wikitext2,ptb) and/or --tasks TASKS")
    if args.batch_size < 1:
        raise ConfigError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.ppl and args.max_windows is not None:
        raise ConfigError("--max-windows sets how much of the --ppl corpora is read; pass --ppl CORPORA too")
    unused = [flag for flag, value in (("--limit", args.limit), ("--stride", args.stride),
                                       ("--request-cache", args.request_cache)) if value is not None]
    if not args.tasks and unused:
        verb = "applies" if len(unused) == 1 else "apply"
        raise ConfigError(f"{' and '.join(unused)} {verb} only to zero-shot tasks; pass --tasks TASKS too")
    tasks: list[str] = []
    if args.tasks:
        from daprune.evaluation.zeroshot import check_request, parse_tasks

        tasks = parse_tasks(args.tasks)
        check_request(tasks, limit=args.limit, batch_size=args.batch_size, stride=args.stride)
    if args.ppl:  # names and window count; the rows are read after the model (whose checks come first)
        check_corpora(args.ppl, args.data_dir, args.max_windows, read=False)
    if args.json:  # its folder now, not after the evaluation
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    from daprune.evaluation.perplexity import evaluate
    from daprune.models.loading import load_model
    from daprune.report import format_table

    model, tok, src = load_model(args.model, dtype=args.dtype, device=args.device, cache=args.cache_dir)
    out: dict = {"model": src.origin, "dtype": args.dtype}
    if args.ppl:
        out.update(evaluate(model, tok, ppl=args.ppl, data_dir=args.data_dir, max_windows=args.max_windows,
                            batch_size=args.batch_size, progress=not args.quiet))
    if args.tasks:
        from daprune.evaluation.zeroshot import evaluate_zeroshot

        zs = evaluate_zeroshot(model, tok, tasks, limit=args.limit, stride=args.stride,
                               batch_size=args.batch_size, progress=not args.quiet,
                               request_cache=args.request_cache)
        out.update(zs)
    rows = [[f"ppl {k}", v] for k, v in out.get("ppl", {}).items()]
    for k, v in out.get("tasks", {}).items():
        metric = out.get("mean_metrics", {}).get(k, "acc")
        rows.append([f"{k} ({metric})", v.get(metric)])
    if "mean" in out:
        rows.append(["mean zero-shot", out["mean"]])
    print(format_table(rows, ["metric", "value"]))
    if args.json:
        atomic_write_json(Path(args.json), out, indent=2, sort_keys=False)
    return 0


class _OneLineParser(argparse.ArgumentParser):
    """argparse whose usage errors are one line, like every other refusal (the usage block is one --help away)."""

    def error(self, message: str):
        print(f"daprune: error: {message} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(2)


def _one_line(exc: BaseException) -> str:
    """An error message on one line: messages that quote a library's error may carry its line breaks."""
    return " ".join(str(exc).split())


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    """SIGTERM raises Interrupted, so it unwinds like Ctrl-C (temp folders removed, the work folder kept)
    instead of killing the process with a half-written temp folder beside the output."""
    def handler(signum, _frame):
        raise Interrupted(signum)

    try:
        previous = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (main() called from a worker): leave signals alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupted(args, signum: int) -> str:
    """The one line for a stopped run: which signal, and whether a work folder remains to resume from."""
    line = f"daprune: interrupted by {signal.Signals(signum).name}"
    if getattr(args, "command", None) == "prune":
        from daprune.checkpoint import default_work_dir

        work = Path(args.work_dir or default_work_dir(args.out))
        if work.is_dir():
            return f"{line}; the work folder {work} is kept: run the same command again to resume"
        return f"{line} before any block was pruned; nothing was written"
    return line


def parse_args(argv: list[str] | None, handlers: dict | None = None) -> argparse.Namespace:
    """The command line as settings; ``handlers`` (if given) receives {command: handler}.

    ``prune --preset NAME`` parses twice: the preset's settings become the defaults of the second parse, so a
    flag given explicitly wins over the preset and everything else is the preset's."""
    parser = _OneLineParser(prog="daprune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    prune = _prune_parser(sub)
    _eval_parser(sub)
    found = {"prune": cmd_prune, "eval": cmd_eval}
    for name in PLUGINS:  # subcommands with their own modules; each imports its heavy parts only when run
        module = importlib.import_module(name)
        found.update(module.add_parser(sub))
    if handlers is not None:
        handlers.update(found)
    args = parser.parse_args(argv)
    if args.command == "prune" and args.preset:
        prune.set_defaults(**preset_settings(args.preset))
        args = parser.parse_args(argv)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run one command. Exit codes: 0 done; 2 refused (bad input or environment, one line on stderr; also
    usage errors); 128 + signal number when stopped by Ctrl-C (130) or SIGTERM (143), the work folder kept."""
    handlers: dict = {}
    try:
        args = parse_args(argv, handlers)
    except SystemExit as exc:  # --help, or a usage error already printed on one line
        return exc.code if isinstance(exc.code, int) else 0
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        with _sigterm_unwinds():
            return handlers[args.command](args)
    except DapruneError as exc:
        print(f"daprune: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, Interrupted) as exc:
        signum = exc.signum if isinstance(exc, Interrupted) else signal.SIGINT
        print(_interrupted(args, signum), file=sys.stderr)
        return 128 + signum


if __name__ == "__main__":
    sys.exit(main())
