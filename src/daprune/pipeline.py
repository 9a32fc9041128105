"""The one-shot streaming pipeline: one decoder block at a time, two activation streams.

For each block: collect statistics of the *pruned* stream (what earlier pruned blocks produce),
optionally re-fit the block's linears to the *dense* stream's outputs (recovery), score heads and
channels, slice, then advance both streams. Only the pipeline moves tensors; module names live in
the adapter, the math in criteria/recovery/schedule.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from tqdm.auto import tqdm

from daprune.block_ops import as_rows, canonical, compensate, copy_block, forward_rows, role_linears
from daprune.config import OBS_MIN_TOKENS_PER_CHANNEL, PruneConfig
from daprune.criteria.base import Criterion, get_criterion, head_columns
from daprune.criteria.similarity import JSAccumulator, algorithm2, select_head_plan
from daprune.errors import CalibrationError, ConfigError, NumericalError
from daprune.experts import ExpertRanker, is_moe, prune_experts, unit_stats
from daprune.fisher import OutputWeight, weighted_rows
from daprune.heldout import HeldoutOutputs
from daprune.hooks import capture
from daprune.models.adapter import BlockAdapter, ModelAdapter
from daprune.recovery import block_target_step, heldout_choice, least_squares_terms, ridge_solve
from daprune.replay import REPLAY_MAX_BYTES, FFNReplay, replay_bytes
from daprune.schedule import BlockPlan, block_parameters, candidate_plans, check_budget, paper_plan
from daprune.selection import greedy_order, obs_ranking
from daprune.stats import BlockStats, Moments
from daprune.token_weight import scaled, token_scale

if TYPE_CHECKING:
    from daprune.checkpoint import WorkDir
    from daprune.stores import ResidentStore

log = logging.getLogger(__name__)


@dataclass
class BlockRecord:
    """What happened to one block; becomes a row of report.json's ``layers``."""

    index: int
    pruned: bool
    plan: dict = field(default_factory=dict)
    kept_heads: list[int] = field(default_factory=list)
    kept_channels: int = 0
    error_input: float = 0.0
    error_no_recovery: float | None = None
    error: float = 0.0
    # the same errors on held-out calibration rows that no statistic saw (None: none held out); the gap to
    # ``error`` / ``error_no_recovery`` is the re-fit's (or the selection's) overfit to its own rows
    error_heldout: float | None = None
    error_no_recovery_heldout: float | None = None
    damping: dict = field(default_factory=dict)
    split_errors: dict = field(default_factory=dict)
    head_divergence: list[list[float]] | None = None
    redundant_heads: list[int] = field(default_factory=list)
    kept_channel_idx: list[int] = field(default_factory=list)
    # mixture-of-experts blocks: tokens routed to each expert, kept channels per expert, unrouted experts
    experts: dict | None = None
    # a block the schedule left whole whose kept weights were re-fitted to the dense stream (--refit-unpruned)
    refit: bool = False
    seconds: float = 0.0


@dataclass
class RefitRows:
    """What a trial block's re-fit (``--sensitivity-refit``) runs on: dense-stream rows ``x`` into the dense
    ``dense`` block, its outputs ``yd``, the first ``n_fit`` rows fitted and the rest held out, and the dense
    block's o_proj input moments paired with its own output (:meth:`BlockPruner.refit_rows`)."""

    dense: BlockAdapter
    x: torch.Tensor
    yd: torch.Tensor
    ctx: dict
    n_fit: int
    o: dict[str, Moments]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12))


class BlockPruner:
    """Prunes one block given its two input streams. Stateless across blocks except settings."""

    def __init__(self, cfg: PruneConfig, ffn_crit: Criterion, head_crit: Criterion | None, target: float,
                 grads: dict[int, dict[str, torch.Tensor]] | None = None,
                 plans: dict[int, BlockPlan] | None = None,
                 fisher: dict[int, dict[str, torch.Tensor]] | None = None,
                 token_grads: dict[int, dict[str, torch.Tensor]] | None = None):
        self.cfg = cfg
        self.plans = plans or {}
        self.ntokens = 0  # scoring calibration tokens, set by run_pipeline
        self.n_score: int | None = None  # stream rows that are scoring samples (the rest: re-fit only)
        self.n_fit: int | None = None  # stream rows any statistic may see; the rest are held out (errors only)
        self.ffn_crit = ffn_crit
        self.head_crit = head_crit
        self.target = target
        # per-block budgets of a global schedule (``--schedule sensitivity``); blocks not in it get ``target``
        self.targets: dict[int, float] = {}
        self.grads = grads or {}
        # --error-weight fisher / kfac: per block, the loss's weight of the o_proj / down_proj output dimensions
        self.fisher = {i: {role: OutputWeight(w) for role, w in roles.items()} for i, roles in (fisher or {}).items()}
        # --token-weight gradient: per block and role, ||g_t||^2 of every stream row's tokens (daprune.fisher)
        self.token_grads = token_grads or {}
        self.use_similarity = cfg.head_criterion == "similarity"
        # roles whose full centred covariance a criterion reads (a second Gram matmul: only where needed)
        self.cov_roles = ffn_crit.needs_cov | (head_crit.needs_cov if head_crit is not None else frozenset())
        if cfg.compensate_mean:
            self.cov_roles |= {"o_in", "down_in"}
        # the last greedy order: (its down_proj moments, the weight's storage and version, the order)
        self._greedy_memo: tuple[Moments, tuple[int, int], OutputWeight | None, list[int]] | None = None
        # form each pruned block's stream output from its last statistics pass (daprune.replay); run_pipeline
        # turns it off where the streams live on disk or on another device than the block
        self.replay = True
        self.output: torch.Tensor | None = None  # the last pruned block's output on the whole pruned stream

    def take_output(self) -> torch.Tensor | None:
        """The pruned block's output on the pruned stream, if its statistics pass could form it (then forgotten)."""
        out, self.output = self.output, None
        return out

    def output_weight(self, block: BlockAdapter) -> dict[str, OutputWeight]:
        """The block's ``--error-weight fisher|kfac`` weights by role ("o", "down"); empty: every dimension alike."""
        return self.fisher.get(block.index, {})

    def selection(self, block: BlockAdapter, tokens: int | None = None) -> str:
        """The FFN selection rule for this block; "auto" picks OBS only with enough tokens.

        A non-default ``--ffn-criterion`` turns "auto" into "score" (PruneConfig.ffn_selection): greedy/OBS
        would pick every removed channel and leave the chosen criterion nothing to decide.
        """
        rule = self.cfg.ffn_selection()
        if rule != "auto":
            return rule
        tokens = self.ntokens if tokens is None else tokens  # an expert: the tokens routed to it
        enough = tokens >= OBS_MIN_TOKENS_PER_CHANNEL * block.n_channels
        return "obs" if enough else "greedy"

    # -- statistics ---------------------------------------------------------------------------------
    def collect(self, block: BlockAdapter, dense: BlockAdapter, xp: torch.Tensor, xd: torch.Tensor, ctx: dict,
                roles: dict[str, bool], js: JSAccumulator | None = None,
                replay: FFNReplay | None = None, yd: torch.Tensor | None = None,
                judge_rows: HeldoutOutputs | None = None) -> dict[str, Moments]:
        """Run both blocks over the streams; accumulate input moments of the requested roles.

        ``roles`` maps a role (attn_in, o_in, ffn_in, down_in) to whether its moments also need the
        cross term with the dense block's output of the same linear(s) (recovery targets). Scores see
        only the first ``n_score`` samples; when the stream holds extra re-fit samples
        (``--recovery-nsamples``), a paired role's least-squares statistics over *all* samples come back
        under ``"ROLE:fit"``. With ``replay``, the pass runs over every stream row and keeps what forms the
        block's output once only its FFN's level-2 linear has changed (daprune.replay); rows past those the
        statistics may see only feed it. With ``yd`` (the dense block's output on ``xd``; ``--recovery-target
        block``) the target of a paired down_in is what down_proj would have to output for the block to give ``yd``
        on the pruned stream: its output now plus (yd - block output now) / gain (``ffn_output_gain``; exact where
        the FFN output is added as it is, a Gauss-Newton step through Gemma's post-FFN norm). ``judge_rows``, with
        that target under ``--recovery heldout``, keeps the held-out rows whole so the re-fit's strength is judged on
        the real block output (daprune.heldout).
        """
        lin = {r: role_linears(block, r)[0] for r in roles}
        tgt = {r: role_linears(dense, r) for r, pair in roles.items() if pair}
        n_fit = min(self.n_fit or xp.shape[0], xp.shape[0])  # held-out rows never enter a statistic
        n_score = min(self.n_score or n_fit, n_fit)
        split = n_score < n_fit
        moments = {r: Moments(f"block {block.index} {r}", full_cov=r in self.cov_roles) for r in roles}
        fit = {r: Moments(f"block {block.index} {r} (re-fit)", full_cov=False) for r, pair in roles.items()
               if pair and split}
        # --recovery heldout: the held-out rows' own least-squares statistics, only to choose the re-fit strength
        held = {r: Moments(f"block {block.index} {r} (held out)", full_cov=False) for r, pair in roles.items()
                if pair and self.cfg.recovery == "heldout" and n_fit < xp.shape[0]}
        n_rows = xp.shape[0] if held or replay is not None else n_fit
        block_target = yd is not None and roles.get("down_in", False)
        dense_mods = {f"{r}:{i}": m for r, pair in roles.items() if pair and not (block_target and r == "down_in")
                      for i, m in enumerate(tgt[r])}
        need_dense = bool(dense_mods)
        # a forward may end once its last hooked linear has run where nothing reads the block's output: always on the
        # dense side (only its linears' outputs are targets), on the pruned side unless the output or the attention
        # maps are read (replay, block target, judged rows, head divergences). Not on experts: a routed linear may run
        # twice or not at all in one forward.
        early = not is_moe(block)
        stop_pruned = early and replay is None and not block_target and judge_rows is None
        bs = self.cfg.batch_size
        scale = token_scale(self.cfg.token_weight, xp, n_fit, bs, self.cfg.first_token_share,
                            self.token_grads.get(block.index))
        starts = list(range(0, n_fit, bs)) + list(range(n_fit, n_rows, bs))  # fit and held-out rows never share a batch
        for s in starts:
            e = min(s + bs, n_fit if s < n_fit else n_rows)
            k = max(0, min(e - s, n_score - s))  # rows of this batch that are scoring samples
            probs: list[torch.Tensor] | None = [] if js is not None and k else None
            y = None  # stays None where the pass stops early (nothing below reads it then)
            with capture({r: lin[r] for r in roles}, stop=stop_pruned and probs is None) as got:
                y = block.forward(xp[s:e], ctx, probs)
            got = as_rows(got, e - s)
            if replay is not None:
                replay.add(y, *got["down_in"])
                if s >= n_fit and not held:
                    continue  # a row only the replay reads
            factors = scale.factors(xp[s:e], s) if scale is not None else None  # once per batch, for every role
            dense_out = {}
            if need_dense:
                with capture(dense_mods, stop=early) as dgot:
                    dense.forward(xd[s:e], ctx)
                dense_out = as_rows(dgot, e - s)
            for r, pair in roles.items():
                x = got[r][0]
                if block_target and r == "down_in":
                    o = got[r][1].float()
                    t = o + block_target_step(o, yd[s:e].float() - y.float(), block.ffn_output_gain(o))
                    if s >= n_fit and judge_rows is not None:
                        judge_rows.add(x, o, y, yd[s:e])
                else:
                    t = torch.cat([dense_out[f"{r}:{i}"][1] for i in range(len(tgt[r]))], -1) if pair else None
                if factors is not None:
                    f = factors[_OUTPUT_ROLE[r]]
                    x, t = scaled(x, f), None if t is None else scaled(t, f)
                if s >= n_fit:
                    if r in held:
                        held[r].update(x, t)
                    continue
                if k:  # the cross term only where the re-fit reads it: not twice when "ROLE:fit" holds it
                    moments[r].update(x[:k], None if t is None or r in fit else t[:k])
                if r in fit:
                    fit[r].update(x, t)
            if probs:
                js.update(probs[0][:k])
        moments.update({f"{r}:fit": m for r, m in fit.items()})
        moments.update({f"{r}:heldout": m for r, m in held.items()})
        if replay is not None:
            replay.snapshot(lin["down_in"])
        return moments

    def fit_moments(self, m: dict[str, Moments], role: str) -> Moments:
        """The least-squares statistics of ``role``: over every sample, extra re-fit samples included."""
        return m.get(f"{role}:fit", m[role])

    def energy(self, mom: Moments) -> torch.Tensor:
        """The matrix whose quadratic form is the output energy a set of removed inputs takes away: the second
        moment, or under ``--compensate-mean`` the centred covariance (the mean part comes back as a bias)."""
        return mom.cov if self.cfg.compensate_mean else mom.second

    def compensate_mean(self, block: BlockAdapter, kind: str, before: torch.Tensor, keep: torch.Tensor | list[int],
                        mom: Moments) -> None:
        """``--compensate-mean``: add to the level-2 linear's bias what its output lost on average when its weight
        went from ``before`` to the current one with only columns ``keep`` left, (W_before - W_after) E[x]."""
        if not self.cfg.compensate_mean:
            return
        lin = block.attn_out() if kind == "attention" else block.ffn_out()
        keep = torch.as_tensor(keep, dtype=torch.long)
        after = torch.zeros_like(before)
        after[:, keep] = lin.weight.data.float()[:, keep]
        block.add_output_bias(kind, (before - after) @ mom.mean.to(before.device))

    # -- recovery -----------------------------------------------------------------------------------
    def refit(self, linears: list, mom: Moments, cols: torch.Tensor | None = None,
              heldout: Moments | None = None, judge: Callable[[torch.Tensor], float] | None = None) -> dict:
        """Least-squares re-fit of ``linears`` (sharing one input) to their dense outputs.

        With ``heldout`` moments (``--recovery heldout``) the ridge pulls toward the current weights, its strength
        is the one with the least error on the held-out rows (``judge``'s, where given), and the weights stay as
        they are when no strength beats them there."""
        has_bias = linears[0].bias is not None
        ws = [lin.weight.data.float() if cols is None else lin.weight.data.float()[:, cols] for lin in linears]
        current = torch.cat(ws, 0)
        if has_bias:
            current = torch.cat([current, torch.cat([lin.bias.data.float() for lin in linears])[:, None]], 1)
        toward_current = self.cfg.ridge_prior() == "original"
        if heldout is not None:
            per_output = self.cfg.heldout_strength == "per-output"
            w, errors = heldout_choice(mom, heldout, cols, has_bias, current, toward_current, judge, per_output)
            if per_output:  # each row its own strength: errors["rows"] says how many rows took which
                info = {"damp": None if w is None else "per-output", "heldout_errors": errors}
            else:
                chosen = min(errors, key=errors.get)
                info = {"damp": None if w is None else float(chosen), "heldout_errors": errors}
            if w is None:
                return info
        else:
            gram, cross = least_squares_terms(mom, cols, has_bias)
            w, solve = ridge_solve(gram, cross, damp=self.cfg.recovery_damp, prior=current if toward_current else None)
            info = {"damp": solve.damp, "escalations": solve.escalations}
        row = 0
        for lin in linears:
            part = w[row : row + lin.out_features]
            row += lin.out_features
            if has_bias:
                lin.bias.data.copy_(part[:, -1].to(lin.bias.dtype))
                part = part[:, :-1]
            if cols is not None:
                lin.weight.data.zero_()
                lin.weight.data[:, cols] = part.to(lin.weight.dtype)
            else:
                lin.weight.data.copy_(part.to(lin.weight.dtype))
        return info

    # -- planning -----------------------------------------------------------------------------------
    def choose_plan(self, block: BlockAdapter, stats: BlockStats, head_imp: torch.Tensor | None,
                    redundant: list[int], rec: BlockRecord, trial: tuple | None = None,
                    candidates: list[BlockPlan] | None = None) -> BlockPlan:
        """The block's heads/channels split. ``auto`` adds the attention and FFN output errors estimated from
        second moments (as if independent; uncompensated even under OBS); ``measured`` runs each candidate on
        ``trial`` = (scoring rows of the pruned stream, the dense outputs on them, ctx) and keeps the one
        with the least real block output error. Both numbers go to report.json ``split_errors``.
        ``candidates``: the splits to weigh (default: every split meeting the per-block budget)."""
        cfg = self.cfg
        if block.index in self.plans:  # a global (adaptive or uniform-layout) schedule decided this block's share
            return self.plans[block.index]
        plans = self.candidates(block) if candidates is None else candidates
        if not plans:
            raise ConfigError(f"block {block.index}: the per-block budget cannot be met")
        if cfg.head_split == "ffn-only" or len(plans) == 1:
            return plans[0]
        if cfg.head_split == "paper":
            plan = paper_plan(block, self.target_of(block.index), cfg.channel_multiple, cfg.kv_groups)
            return plan if plan is not None else plans[0]
        # auto: pick the split with the least squared error added to the residual stream, measured
        # exactly from the second moments of the o_proj and down_proj inputs.
        ffn_error = self.ffn_error(block, stats, max(p.channels for p in plans), trial)
        o = weighted_rows(block.attn_out().weight.float(), stats.output_weight.get("o"))
        z2 = self.energy(stats.o_in)
        hd = block.head_dim
        measured = cfg.head_split == "measured" and trial is not None
        best, best_err = plans[0], float("inf")
        for plan in plans:
            heads = select_head_plan(block.head_groups(), plan.heads_per_group, plan.kv_groups, head_imp, redundant)
            cols = head_columns(heads, hd)
            e_attn = self.attn_error(o, z2, cols) if heads else 0.0
            e_ffn, rm = ffn_error(plan.channels)
            row = {"attn": e_attn, "ffn": e_ffn, "channels": plan.channels, "estimate": e_attn + e_ffn}
            err = e_attn + e_ffn
            if measured:
                row["measured"] = err = self.measure_plan(block, heads, rm.tolist(), stats, *trial)
            rec.split_errors[_plan_key(plan)] = row
            if err < best_err:
                best, best_err = plan, err
        return best

    def target_of(self, index: int) -> float:
        """Parameters block ``index`` must lose: its share under a global schedule, else the uniform target."""
        return self.targets.get(index, self.target)

    def heads_allowed(self, block: BlockAdapter) -> bool:
        """Whether this block may lose heads: a head criterion, and more than one head to choose from."""
        return self.head_crit is not None and (block.group_size > 1 or block.n_heads > 1)

    def candidates(self, block: BlockAdapter, heads: bool = True) -> list[BlockPlan]:
        """Every split meeting the per-block budget (heads only where allowed and ``heads``)."""
        allowed = heads and self.heads_allowed(block)
        return candidate_plans(block, self.target_of(block.index), self.cfg.channel_multiple,
                               max_heads_per_group=None if allowed else 0, kv_groups=self.cfg.kv_groups)

    def split_roles(self, block: BlockAdapter, pair_o: bool) -> dict[str, bool]:
        """Statistics the head/FFN split and the scores read: the inputs of o_proj (paired with the dense
        outputs when ``pair_o``: a re-fit follows) and down_proj, and whatever else the criteria need.
        Mixture-of-experts blocks get their FFN statistics per expert (:mod:`daprune.experts`) instead."""
        needs = self.ffn_crit.needs | (self.head_crit.needs if self.head_crit else frozenset())
        moe = is_moe(block)
        roles = {"o_in": pair_o} if moe else {"o_in": pair_o, "down_in": False}
        if "attn_in" in needs:
            roles["attn_in"] = False
        if "ffn_in" in needs and not moe:
            roles["ffn_in"] = False
        return roles

    def head_importance(self, block: BlockAdapter, stats: BlockStats, js: JSAccumulator | None,
                        rec: BlockRecord) -> tuple[torch.Tensor | None, list[int]]:
        """Head scores and, with the similarity criterion, the redundant heads (Algorithm 2), both into ``rec``."""
        head_imp, redundant = None, []
        if self.head_crit is not None:
            head_imp = self.head_crit.head_scores(block, stats).float()
            if js is not None:
                div = js.divergence
                rec.head_divergence = div.tolist()
                redundant = algorithm2(div, self.cfg.tau, head_imp)
                rec.redundant_heads = redundant
        return head_imp, redundant

    def dense_statistics(self, block: BlockAdapter, x: torch.Tensor, ctx: dict, rec: BlockRecord
                         ) -> tuple[BlockStats, torch.Tensor | None, list[int]]:
        """What choosing a block's split reads, from rows ``x`` with no re-fit (the global schedules' passes over
        the dense blocks): the split roles' moments, head importance and redundant heads (also into ``rec``)."""
        js = JSAccumulator(block.n_heads) if self.use_similarity and block.n_heads > 1 else None
        m = self.collect(block, block, x, x, ctx, self.split_roles(block, False), js)
        stats = BlockStats(attn_in=m.get("attn_in"), o_in=m["o_in"], ffn_in=m.get("ffn_in"), down_in=m.get("down_in"),
                           output_weight=self.output_weight(block))
        head_imp, redundant = self.head_importance(block, stats, js, rec)
        return stats, head_imp, redundant

    def ffn_error(self, block: BlockAdapter, stats: BlockStats, most: int,
                  rows: tuple) -> Callable[[int], tuple[float, torch.Tensor]]:
        """``channels -> (estimated FFN output energy removed, the channels removed)`` for the split decision.

        A mixture-of-experts block sums its experts' estimates, from statistics of the scoring ``rows``."""
        if is_moe(block):
            ranker = ExpertRanker(self, block, unit_stats(block, rows[0], rows[2], self.cfg), rows[0], rows[2])
            return lambda c: (ranker.error(c, most), torch.empty(0, dtype=torch.long))
        ffn_rank = self.ffn_ranking(block, stats, most)
        d = weighted_rows(block.ffn_out().weight.float(), stats.output_weight.get("down"))
        h2 = self.energy(stats.down_in)

        def error(channels: int) -> tuple[float, torch.Tensor]:
            rm = ffn_rank[:channels]
            e = float(torch.einsum("oi,ij,oj->", d[:, rm], h2[rm][:, rm], d[:, rm])) if channels else 0.0
            return e, rm

        return error

    def measure_plan(self, block: BlockAdapter, heads: list[int], removed: list[int], stats: BlockStats,
                     x: torch.Tensor, y: torch.Tensor, ctx: dict) -> float:
        """Real squared block output error per token, E||block'(x) - y||^2, of a trial copy with ``heads`` and
        FFN channels ``removed`` cut (under OBS with the kept down_proj columns least-squares compensated), in
        the units of the estimate. Costs one copy and one block forward over the scoring rows per candidate."""
        out = forward_rows(self.trial_block(block, heads, removed, stats), x, ctx, self.cfg.batch_size)
        return float((out.float() - y.float()).pow(2).sum(-1).mean())

    def trial_block(self, block: BlockAdapter, heads: list[int], removed: list[int], stats: BlockStats,
                    rows: RefitRows | None = None) -> BlockAdapter:
        """A pruned copy of ``block``: ``heads`` and FFN channels ``removed`` cut, as :meth:`prune` would cut them
        (under OBS with the kept down_proj columns least-squares compensated); ``block`` is untouched.

        With ``rows`` (``--sensitivity-refit``) the copy also gets the post-pruning re-fit :meth:`prune` gives a
        block whose input is the dense stream: the kept o_proj columns to the dense attention output, then (with
        OBS on the FFN input moments after the heads are cut, as :meth:`prune` orders it) the kept down_proj
        columns to the dense down_proj or block output, each strength chosen on the held-out rows under
        ``--recovery heldout``. The q/k/v and gate/up re-fits are left out: on dense inputs their targets are
        the linears' own outputs."""
        trial = copy_block(block)
        if heads:
            gone = set(heads)
            keep_heads = [h for h in range(trial.n_heads) if h not in gone]
            kept_cols = head_columns(keep_heads, trial.head_dim)
            before = trial.attn_out().weight.data.float().clone()
            self.compensate_heads(trial, keep_heads, stats)
            self.compensate_mean(trial, "attention", before, kept_cols, stats.o_in)
            if rows is not None:
                self.refit([trial.attn_out()], self.fit_moments(rows.o, "o_in"), kept_cols, rows.o.get("o_in:heldout"))
            self.head_crit.after_head_prune(trial, heads, stats)
            trial.slice_heads(keep_heads)
        if removed:
            gone = set(removed)
            keep = [c for c in range(trial.n_channels) if c not in gone]
            down = trial.ffn_out().weight
            before = down.data.float().clone()
            down_in, m, judge_rows = stats.down_in, None, None
            if rows is not None:  # the FFN input as it is once the heads are cut (and o_proj re-fitted)
                m, judge_rows = self._down_refit_moments(trial, rows)
                down_in = m["down_in"]
            if self.selection(block) == "obs":
                down.data.copy_(compensate(down.float(), self.energy(down_in), keep,
                                           self.cfg.obs_damp).to(down.dtype))
            self.compensate_mean(trial, "mlp", before, keep, down_in)
            if m is not None:
                cols = torch.tensor(keep, dtype=torch.long)
                judge = judge_rows.judge(trial, cols) if judge_rows is not None else None
                self.refit([trial.ffn_out()], self.fit_moments(m, "down_in"), cols, m.get("down_in:heldout"), judge)
            self.ffn_crit.after_ffn_prune(trial, removed, stats)
            trial.slice_ffn(keep)
        return trial

    def refit_rows(self, block: BlockAdapter, x: torch.Tensor, yd: torch.Tensor, ctx: dict, n_fit: int
                   ) -> RefitRows:
        """What :meth:`trial_block`'s re-fit reads for a dense ``block`` on dense-stream rows ``x`` (the first
        ``n_fit`` fitted, the rest held out) with outputs ``yd``: the rows and the block's paired o_proj moments
        (on dense inputs the same for every trial of the block, so collected once)."""
        with self._fit_rows(n_fit):
            o = self.collect(block, block, x, x, ctx, {"o_in": True})
        return RefitRows(block, x, yd, ctx, n_fit, o)

    def _down_refit_moments(self, trial: BlockAdapter, rows: RefitRows
                            ) -> tuple[dict[str, Moments], HeldoutOutputs | None]:
        """The trial's down_proj input moments on ``rows``, paired with the re-fit's target (the dense down_proj
        output, or under ``--recovery-target block`` what it must output for the block to give the dense output)
        and, where the held-out choice must judge the real block output, the held-out rows kept whole."""
        yd = rows.yd if self.cfg.recovery_target == "block" else None
        judge_rows = self.judge_rows(trial)
        with self._fit_rows(rows.n_fit):
            m = self.collect(trial, rows.dense, rows.x, rows.x, rows.ctx, {"down_in": True}, yd=yd,
                             judge_rows=judge_rows)
        return m, judge_rows

    def judge_rows(self, block: BlockAdapter) -> HeldoutOutputs | None:
        """Where a down_proj re-fit's held-out choice must judge the real block output, the collector of the
        held-out rows: under ``--recovery heldout --recovery-target block`` where the FFN output does not reach the
        block output as it is (then the block target is a linearisation)."""
        if self.cfg.recovery_target == "block" and self.cfg.recovery == "heldout" and block.ffn_output_scale() is None:
            return HeldoutOutputs()
        return None

    @contextlib.contextmanager
    def _fit_rows(self, n_fit: int):
        """Within: the first ``n_fit`` stream rows are the scoring and fit rows, the rest held out."""
        saved = self.n_score, self.n_fit
        self.n_score = self.n_fit = n_fit
        try:
            yield
        finally:
            self.n_score, self.n_fit = saved

    def attn_error(self, o: torch.Tensor, z2: torch.Tensor, cols: torch.Tensor) -> float:
        """Residual-stream energy lost with o_proj input columns ``cols``: tr(O_R S_RR O_R^T), or under
        ``--compensate-heads`` what :func:`compensate` leaves: with M = S_RK (S_KK + lambda I)^-1 the residual is
        O_R (z_R - M z_K), so tr(O_R (S_RR - M S_KR - S_RK M^T + M S_KK M^T) O_R^T) (the Schur complement
        S_RR - S_RK S_KK^-1 S_KR when lambda = 0)."""
        if not self.cfg.compensate_heads:
            return float(torch.einsum("oi,ij,oj->", o[:, cols], z2[cols][:, cols], o[:, cols]))
        s = z2.double()
        gone = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
        gone[cols] = True
        r, k = gone.nonzero().flatten(), (~gone).nonzero().flatten()
        lam = self.cfg.obs_damp * torch.diagonal(s).mean().clamp_min(1e-12)
        s_kk, s_rk = s[k][:, k], s[r][:, k]
        m = torch.linalg.solve(s_kk + lam * torch.eye(len(k), dtype=s.dtype, device=s.device), s_rk.T).T
        left = s[r][:, r] - m @ s_rk.T - s_rk @ m.T + m @ s_kk @ m.T
        o_r = o[:, r].double()
        return float(torch.einsum("oi,ij,oj->", o_r, left, o_r))

    def compensate_heads(self, block: BlockAdapter, keep_heads: list[int], stats: BlockStats) -> None:
        """``--compensate-heads``: the kept heads' o_proj columns least-squares re-fitted to the whole attention
        output on the scoring rows (what OBS does for the kept down_proj columns), before the heads are cut."""
        if not self.cfg.compensate_heads:
            return
        cols = head_columns(keep_heads, block.head_dim).tolist()
        o = block.attn_out().weight
        o.data.copy_(compensate(o.float(), self.energy(stats.o_in), cols, self.cfg.obs_damp).to(o.dtype))

    def ffn_ranking(self, block: BlockAdapter, stats: BlockStats, count: int, rule: str | None = None) -> torch.Tensor:
        """Channel indices, first the ``count`` to remove, in removal order; then the rest by score.

        ``block`` may also be one FFN of a mixture-of-experts block (``models.moe.FFNUnit``), with ``rule``
        its own selection rule."""
        by_score = torch.sort(self.ffn_crit.ffn_scores(block, stats).float(), stable=True).indices
        if (rule or self.selection(block)) == "score" or count == 0:
            return by_score
        # greedy output approximation (also the estimate for obs, whose compensation comes later)
        first = self.greedy(block, stats.down_in, count, stats.output_weight.get("down"))
        taken = set(first)
        return torch.tensor(first + [c for c in by_score.tolist() if c not in taken], dtype=torch.long)

    def greedy(self, block: BlockAdapter, moments: Moments, count: int, weight: OutputWeight | None = None
               ) -> list[int]:
        """:func:`greedy_order` of ``count`` channels, reusing the previous call's order when it saw the same
        moments, the same down_proj weight and the same ``--error-weight`` weights: every prefix of a greedy order
        is the greedy order for that count, so the split decision's order (for the most channels any split
        removes) also serves the prune of a block whose statistics did not change in between."""
        w = block.ffn_out().weight
        key = (w.data_ptr(), w._version)
        memo = self._greedy_memo
        if memo is not None and memo[0] is moments and memo[1] == key and memo[2] is weight and len(memo[3]) >= count:
            return memo[3][:count]
        order = greedy_order(weighted_rows(w.float(), weight), self.energy(moments), count)
        self._greedy_memo = (moments, key, weight, order)
        return order

    # -- one block ----------------------------------------------------------------------------------
    @torch.no_grad()
    def prune(self, block: BlockAdapter, dense: BlockAdapter, xp: torch.Tensor, xd: torch.Tensor,
              yd: torch.Tensor, ctx: dict, whole: bool = False) -> BlockRecord:
        """Prune ``block`` in place. ``dense`` is an untouched copy; ``yd`` its output on ``xd``.

        ``whole`` (``--refit-unpruned``): remove nothing, but give every kept linear the re-fits a pruned block gets
        (o_proj and down_proj over all their columns, q/k/v and gate/up with ``--recovery-inputs``): a block left
        whole downstream of pruned ones sees a drifted stream, and left alone it passes the drift on, amplified."""
        t0 = time.perf_counter()
        cfg = self.cfg
        rec = BlockRecord(block.index, not whole, refit=whole)
        paper, post = cfg.recovery in ("paper", "both"), cfg.recovery in ("post", "both", "heldout")
        inputs = paper or cfg.recovery_inputs  # q/k/v and gate/up re-fitted to their dense outputs
        stats = BlockStats(grads=self.grads.get(block.index, {}), output_weight=self.output_weight(block))
        needs = self.ffn_crit.needs | (self.head_crit.needs if self.head_crit else frozenset())
        self.output = None
        moe = is_moe(block)
        replay = (self.replay and not moe and replay_bytes(
            xp.shape[0], xp.shape[1], xp.shape[-1], block.n_channels, xp.dtype) <= REPLAY_MAX_BYTES)

        if inputs:  # 1) q, k, v share one input Gram
            m = self.collect(block, dense, xp, xd, ctx, {"attn_in": True})
            stats.attn_in = m["attn_in"]
            rec.damping["qkv"] = self.refit(block.attn_in(), self.fit_moments(m, "attn_in"),
                                            heldout=m.get("attn_in:heldout"))

        # 2) o_proj input (after the q/k/v re-fit), head divergences, FFN moments for the split decision
        js = JSAccumulator(block.n_heads) if self.use_similarity and block.n_heads > 1 and not whole else None
        roles = self.split_roles(block, paper or post)
        split_replay = FFNReplay() if replay and "down_in" in roles else None
        m = split_m = self.collect(block, dense, xp, xd, ctx, roles, js, split_replay)
        stats.o_in, stats.down_in = m["o_in"], m.get("down_in")
        stats.attn_in = stats.attn_in or m.get("attn_in")
        stats.ffn_in = m.get("ffn_in")
        o_fit = self.fit_moments(m, "o_in")
        if paper:
            rec.damping["o"] = self.refit([block.attn_out()], o_fit)

        n_score = min(self.n_score or xp.shape[0], self.n_fit or xp.shape[0], xp.shape[0])
        if whole:
            head_imp, redundant, plan = None, [], BlockPlan(0, 0, 0)
        else:
            head_imp, redundant = self.head_importance(block, stats, js, rec)
            plan = self.choose_plan(block, stats, head_imp, redundant, rec, (xp[:n_score], yd[:n_score], ctx))
        rec.plan = {"heads_per_group": plan.heads_per_group, "kv_groups": plan.kv_groups, "channels": plan.channels,
                    "params": plan.params}

        # 3) heads
        removed_heads = select_head_plan(block.head_groups(), plan.heads_per_group, plan.kv_groups, head_imp,
                                         redundant) if plan.heads_per_group or plan.kv_groups else []
        keep_heads = [h for h in range(block.n_heads) if h not in removed_heads]
        if removed_heads:
            kept_cols = head_columns(keep_heads, block.head_dim)
            before = block.attn_out().weight.data.float().clone()
            self.compensate_heads(block, keep_heads, stats)
            self.compensate_mean(block, "attention", before, kept_cols, stats.o_in)
            if post:
                rec.damping["o_post"] = self.refit([block.attn_out()], o_fit, kept_cols, m.get("o_in:heldout"))
            self.head_crit.after_head_prune(block, removed_heads, stats)
            block.slice_heads(keep_heads)
        elif whole and post:
            rec.damping["o_post"] = self.refit([block.attn_out()], o_fit, heldout=m.get("o_in:heldout"))
        rec.kept_heads = keep_heads

        if moe:  # 4') every expert its own depth-2 unit, statistics after the heads were cut
            rec.experts = prune_experts(self, block, xp[:n_score], ctx, plan.channels)
            rec.kept_channels = block.n_channels
            rec.plan["selection"] = ",".join(rec.experts["selection"])
            rec.seconds = time.perf_counter() - t0
            return rec

        # 4) FFN: gate/up re-fit, then down's input and re-fit, then channel scores on recovered weights
        if inputs:
            m = self.collect(block, dense, xp, xd, ctx, {"ffn_in": True})
            stats.ffn_in = m["ffn_in"]
            rec.damping["gate_up"] = self.refit(block.ffn_in(), self.fit_moments(m, "ffn_in"),
                                                heldout=m.get("ffn_in:heldout"))
        roles = {"down_in": paper or post}
        if "ffn_in" in needs and not inputs:
            roles["ffn_in"] = False
        block_target = cfg.recovery_target == "block"
        judge_rows = self.judge_rows(block) if post else None
        if not removed_heads and not (paper or post) and "down_in" in split_m:
            m = split_m  # nothing changed since step 2: its FFN statistics stand (one block forward saved)
            last_pass = split_replay
        else:
            split_replay = None
            last_pass = FFNReplay() if replay else None
            m = self.collect(block, dense, xp, xd, ctx, roles, replay=last_pass, yd=yd if block_target else None,
                             judge_rows=judge_rows)
        stats.down_in = m["down_in"]
        stats.ffn_in = m.get("ffn_in", stats.ffn_in)
        down_fit = self.fit_moments(m, "down_in")
        if paper:
            rec.damping["down"] = self.refit([block.ffn_out()], down_fit)
        rec.plan["selection"] = "none" if whole else self.selection(block)  # a whole block selects nothing
        before = block.ffn_out().weight.data.float().clone() if cfg.compensate_mean else None
        if whole:
            order = torch.arange(block.n_channels)
        elif rec.plan["selection"] == "obs" and plan.channels:
            # OBS: greedy removal with least-squares compensation of the kept down_proj columns
            # under --error-weight fisher / kfac on weighted rows; every row gets the same input-side update, so
            # undoing the weighting leaves the same least-squares compensation
            fw = stats.output_weight.get("down")
            order, w = obs_ranking(weighted_rows(block.ffn_out().weight.float(), fw), self.energy(stats.down_in),
                                   plan.channels, cfg.obs_damp)
            if fw is not None:
                w = fw.unrows(w)
            block.ffn_out().weight.data.copy_(w.to(block.ffn_out().weight.dtype))
        else:
            order = self.ffn_ranking(block, stats, plan.channels)
        removed = order[: plan.channels]
        keep = torch.sort(order[plan.channels :]).values
        if plan.channels and before is not None:
            self.compensate_mean(block, "mlp", before, keep, stats.down_in)
        if (plan.channels or whole) and post:
            judge = judge_rows.judge(block, keep) if judge_rows is not None else None
            rec.damping["down_post"] = self.refit([block.ffn_out()], down_fit, keep, m.get("down_in:heldout"), judge)
        if plan.channels:
            self.ffn_crit.after_ffn_prune(block, removed.tolist(), stats)
            block.slice_ffn(keep.tolist())
        rec.kept_channels = len(keep)
        rec.kept_channel_idx = keep.tolist()
        if last_pass is not None:
            self.output = last_pass.output(block, keep if plan.channels else None)

        if cfg.recovery != "none":  # the same choices without any re-fit, for the report
            plain = copy_block(dense)
            if removed_heads:
                self.compensate_mean(plain, "attention", plain.attn_out().weight.data.float().clone(), kept_cols,
                                     stats.o_in)
                self.head_crit.after_head_prune(plain, removed_heads, stats)
                plain.slice_heads(keep_heads)
            if plan.channels:
                self.compensate_mean(plain, "mlp", plain.ffn_out().weight.data.float().clone(), keep, stats.down_in)
                self.ffn_crit.after_ffn_prune(plain, removed.tolist(), stats)
                plain.slice_ffn(keep.tolist())
            rec.error_no_recovery, rec.error_no_recovery_heldout = self.split_errors(plain, xp, yd, ctx)
        rec.seconds = time.perf_counter() - t0
        return rec


    def split_errors(self, block: BlockAdapter, x: torch.Tensor, y: torch.Tensor,
                     ctx: dict) -> tuple[float, float | None]:
        """Relative error of ``block`` on ``x`` against ``y`` on the fit rows and (if any) the held-out rows.

        Each part runs in its own batches, so the fit rows are computed exactly as without held-out rows.
        """
        n_fit = min(self.n_fit or x.shape[0], x.shape[0])
        fit = _rel(forward_rows(block, x[:n_fit], ctx, self.cfg.batch_size), y[:n_fit])
        if n_fit == x.shape[0]:
            return fit, None
        return fit, _rel(forward_rows(block, x[n_fit:], ctx, self.cfg.batch_size), y[n_fit:])


def _kl_copy_rows(cfg: PruneConfig, adapter: ModelAdapter, store, ids: torch.Tensor) -> torch.Tensor | None:
    """``--sensitivity-copy-rows``: the scoring rows right after the KL rows, each with its first half repeated,
    embedded; the sensitivity pass measures its KL on them too, and nothing else reads them."""
    if not cfg.sensitivity_copy_rows:
        return None
    from daprune.config import SENSITIVITY_NSAMPLES
    from daprune.data.copy_rows import repeated

    first = cfg.sensitivity_nsamples or SENSITIVITY_NSAMPLES
    rows = repeated(ids[first : first + cfg.sensitivity_copy_rows], getattr(adapter.config, "bos_token_id", None))
    return store.embed(rows, cfg.batch_size, tag="kl-copy-rows")


def _block_shares(cfg: PruneConfig, view, store, pruner: BlockPruner, x: torch.Tensor, contexts: list[dict],
                  blocks: range, budget: float, ids: torch.Tensor, progress: bool = False,
                  heldout: torch.Tensor | None = None) -> dict:
    """The report entry of a global schedule that gives each block its own share of the budget: measured
    (``sensitivity``: each block's effect on the output distribution) or by outlier ratio (``owl``), or the one
    ``--allocation-from`` names, checked against these blocks and this budget. ``ids``: the calibration token ids,
    whence ``--sensitivity-copy-rows`` makes its rows (only when the pass runs)."""
    if cfg.allocation_from is not None:
        from daprune.allocation_reuse import check_against, read_allocation

        return check_against(read_allocation(cfg.allocation_from, cfg.to_dict(), cfg.layers_spec()), blocks, budget)
    if cfg.schedule == "sensitivity":
        from daprune.allocation import sensitivity_targets
        from daprune.config import SEARCH_NSAMPLES, SENSITIVITY_NSAMPLES, parse_multiples

        sizes = parse_multiples(cfg.sensitivity_sizes) if cfg.sensitivity_sizes else None
        with store.outside_layers(head=True):
            return sensitivity_targets(view, pruner, x, contexts, blocks, budget,
                                       cfg.sensitivity_nsamples or SENSITIVITY_NSAMPLES, multiples=sizes,
                                       search=cfg.allocation_search or 0,
                                       search_nsamples=cfg.search_nsamples or SEARCH_NSAMPLES, seed=cfg.seed,
                                       progress=progress, refit=cfg.sensitivity_refit, heldout=heldout,
                                       kl_extra=_kl_copy_rows(cfg, view, store, ids))[1]
    from daprune.owl import OWL_LAMBDA, OWL_THRESHOLD, owl_targets

    return owl_targets(view, pruner, x, contexts, blocks, budget, cfg.owl_lambda or OWL_LAMBDA,
                       cfg.owl_threshold or OWL_THRESHOLD)[1]


# each statistic role's output linear, by the name fisher / token weights use: the attention's or the FFN's
_OUTPUT_ROLE = {"attn_in": "o", "o_in": "o", "ffn_in": "down", "down_in": "down"}


@dataclass
class PipelineResult:
    records: list[BlockRecord]
    params_before: int
    params_after: int
    target_per_block: float
    timings: dict
    block_params_before: int = 0
    block_params_after: int = 0
    layout: dict | None = None  # --layout uniform: the shared split and each candidate's total estimated error
    allocation: dict | None = None  # --schedule sensitivity: measured curves and each block's share
    logit_scale: dict | None = None  # --logit-scale fit: the scales tried, their KLs, the one kept
    # parameters (by name) the output must hold instead of the source's: a streamed model's final norm carrying the
    # logit scale (a resident model holds them already)
    output_tensors: dict = field(default_factory=dict)


def _plan_key(plan: BlockPlan) -> str:
    """report.json key of a candidate split: heads per group, with whole KV groups when any."""
    return str(plan.heads_per_group) if not plan.kv_groups else f"{plan.kv_groups}g+{plan.heads_per_group}"


@torch.no_grad()
def run_pipeline(adapter: ModelAdapter, ids: torch.Tensor, cfg: PruneConfig, *, progress: bool = True,
                 grads: dict | None = None, store: ResidentStore | None = None,
                 work: WorkDir | None = None, heldout: int = 0, fisher: dict | None = None,
                 token_grads: dict | None = None) -> PipelineResult:
    """Prune ``adapter.model`` in place, block by block, from calibration token ids.

    ``store`` decides how blocks are obtained: resident (default, the whole model in memory) or streamed
    from disk one at a time (:class:`daprune.stores.StreamingStore`), and where the activation
    streams live. ``work`` (a :class:`daprune.checkpoint.WorkDir`) checkpoints every finished block and,
    if it holds an interrupted run, continues after its last finished block. The last ``heldout`` rows of
    ``ids`` are held out: they travel with both streams, but no statistic (score, selection, re-fit) sees
    them; each block's errors are also measured on them (``error_heldout``), so overfitting shows. ``fisher``: the
    per-block output weights of ``--error-weight fisher|kfac`` (:func:`daprune.fisher.output_fisher`);
    ``token_grads`` the per-token weights of ``--token-weight gradient`` (:func:`daprune.fisher.token_gradients`).
    """
    from daprune.stores import LoadingAdapter, ResidentStore
    from daprune.weights import count_parameters

    t0 = time.perf_counter()
    store = store or ResidentStore(adapter)
    acts = store.acts
    layer_range = cfg.block_range(adapter.n_layers)
    params_before = count_parameters(adapter.model)
    blocks_before = block_parameters([adapter.block(i) for i in range(adapter.n_layers)])
    basis = params_before if cfg.sparsity_basis == "total" else blocks_before
    target, widest = 0.0, 0
    if cfg.sparsity > 0:  # from the dense shapes: before any restored block is given its pruned shape
        blocks = [canonical(adapter, i) for i in layer_range]
        target = check_budget(blocks, basis, cfg.sparsity, cfg.channel_multiple, cfg.kv_groups, cfg.sparsity_basis)
        widest = max(b.n_channels for b in blocks)  # canonical: native GPT-2 Conv1D has no in_features
        for b in blocks:  # back to the form the stores read and write
            b.to_native()
    if heldout < 0 or (heldout and heldout >= ids.shape[0]):
        raise ConfigError(f"{heldout} held-out rows leave none of the {ids.shape[0]} calibration rows to prune with")
    n_fit = ids.shape[0] - heldout
    hidden = adapter.config.hidden_size
    if n_fit * ids.shape[1] < hidden:
        raise CalibrationError(
            f"{n_fit * ids.shape[1]} calibration tokens are fewer than the hidden size {hidden}: the input second "
            "moments would be rank-deficient; raise --nsamples or --seqlen"
        )
    ffn_crit = get_criterion(cfg.ffn_criterion, seed=cfg.seed)
    head_name = {"similarity": "second-moment", "none": None}.get(cfg.head_criterion, cfg.head_criterion)
    head_crit = get_criterion(head_name, seed=cfg.seed) if head_name else None

    restored = work.restore(adapter.n_layers) if work is not None else None
    plans: dict[int, BlockPlan] | None = None
    if restored is not None:
        start = restored.next_block
        records = [BlockRecord(**r) for r in restored.records]
        for i in range(start):
            store.restore(i, work.block_file(i))
        _register_restored(acts, work, restored)  # mmap streams stay where they are (adopt keeps them)
        xp = acts.adopt(restored.xp, f"p-{start - 1:05d}")
        xd = None if restored.xd is None else acts.adopt(restored.xd, f"d-{start - 1:05d}")
        if restored.plans is not None:
            plans = {i: BlockPlan(**p) for i, p in restored.plans.items()}
    else:
        start, records = 0, []
        xp = store.embed(ids, cfg.batch_size)
        xd = None  # the dense stream equals the pruned one until the first pruned block
    contexts = store.layer_inputs(ids.shape[1])  # what the model itself passes each layer
    if plans is None and cfg.schedule == "adaptive" and cfg.sparsity > 0:
        # FLAP-style global structure search: needs every block's scores before any block is pruned
        from daprune.adaptive import adaptive_plans

        view = LoadingAdapter(adapter, store)
        try:
            plans = adaptive_plans(view, xp[: cfg.nsamples], contexts, layer_range, target * len(layer_range), ffn_crit,
                                   head_crit, cfg)
        finally:
            view.close()
    pruner = BlockPruner(cfg, ffn_crit, head_crit, target, grads, plans, fisher, token_grads)
    pruner.replay = acts.mode != "disk" and not acts.moves
    pruner.n_score = min(cfg.nsamples, n_fit)
    pruner.n_fit = n_fit
    pruner.ntokens = pruner.n_score * ids.shape[1]
    allocation = restored.extra.get("allocation") if restored is not None else None
    if cfg.schedule in ("sensitivity", "owl") and cfg.sparsity > 0:
        if allocation is None:
            view = LoadingAdapter(adapter, store)
            try:
                allocation = _block_shares(cfg, view, store, pruner, xp[: pruner.n_score], contexts, layer_range,
                                           target * len(layer_range), ids, progress,
                                           xp[n_fit:] if heldout else None)
            finally:
                view.close()
        pruner.targets = {int(i): float(t) for i, t in allocation["targets"].items()}
    layout = None
    if cfg.layout == "uniform" and cfg.sparsity > 0:
        if plans is None:  # one split for every block, from the dense blocks (restored runs reuse theirs)
            from daprune.layout import uniform_plan

            view = LoadingAdapter(adapter, store)
            try:
                shared, layout = uniform_plan(view, pruner, xp[: pruner.n_score], contexts)
            finally:
                view.close()
            plans = pruner.plans = {i: shared for i in layer_range}
        else:
            layout = {"mode": "uniform", "plan": dataclasses.asdict(next(iter(plans.values()))), "restored": True}
    if cfg.sparsity > 0 and cfg.recovery not in ("none", "heldout") and n_fit * ids.shape[1] < \
            OBS_MIN_TOKENS_PER_CHANNEL * widest:
        log.warning("recovery re-fits %d-wide least-squares problems on only %d calibration tokens: expect it to "
                    "overfit (held-out tuning: 16 x 128 tokens hurt, 128 x 128 helped); pass --recovery-nsamples 128 "
                    "or more", widest, n_fit * ids.shape[1])
    for i in tqdm(range(start, adapter.n_layers), desc="pruning blocks", disable=not progress,
                  initial=start, total=adapter.n_layers):
        _seed_block(cfg.seed, i)
        ctx = contexts[i]
        block = store.load(i)
        x_dense = xp if xd is None else xd
        prune_here = i in layer_range and cfg.sparsity > 0 and pruner.target_of(i) > 0
        refit_here = not prune_here and cfg.refit_unpruned and xd is not None  # whole, on a drifted stream
        if prune_here or refit_here:
            dense = copy_block(block)
            yd = acts.forward(dense, x_dense, ctx, cfg.batch_size, f"d-{i:05d}")
            rec = pruner.prune(block, dense, xp, x_dense, yd, ctx, whole=refit_here)
            del dense
        else:
            rec = BlockRecord(i, False, kept_heads=list(range(block.n_heads)), kept_channels=block.n_channels)
            yd = acts.forward(block, x_dense, ctx, cfg.batch_size, f"d-{i:05d}")
        if xd is None and not rec.pruned:
            xp = yd  # streams still identical
        else:
            yp = pruner.take_output()
            if yp is None:
                yp = acts.forward(block, xp, ctx, cfg.batch_size, f"p-{i:05d}")
            rec.error_input = _rel(xp[:n_fit], x_dense[:n_fit])
            rec.error = _rel(yp[:n_fit], yd[:n_fit])
            if heldout:
                rec.error_heldout = _rel(yp[n_fit:], yd[n_fit:])
            xp, xd = yp, yd
        if not torch.isfinite(xp).all():
            raise NumericalError(f"non-finite activations after block {i}")
        records.append(rec)
        store.finish(i, work.block_file(i) if work is not None else None)
        if work is not None:
            files = None
            if acts.mode == "disk":
                files = {k: str(acts.file_of(t).relative_to(work.path)) if t is not None else None
                         for k, t in (("xp", xp), ("xd", xd))}
            work.commit(i, records, xp, xd, plans, acts_files=files,
                        extra={"allocation": allocation} if allocation is not None else None)
        acts.gc([xp, xd])
    timings = {"pipeline_s": time.perf_counter() - t0}
    logit_scale, output_tensors = None, {}
    if cfg.logit_scale == "fit" and xd is not None:  # xd None: nothing was pruned, the logits are the dense ones
        from daprune.logit_scale import apply_tensors, fit_logit_scale

        t = time.perf_counter()
        with store.outside_layers(head=True):
            logit_scale, output_tensors = fit_logit_scale(adapter, xp, xd, n_fit, cfg.batch_size)
            output_tensors = {k: v.detach().cpu() for k, v in output_tensors.items()}
        if not store.streaming:
            apply_tensors(adapter.model, output_tensors)
            output_tensors = {}
        timings["logit_scale_s"] = time.perf_counter() - t
    after = count_parameters(adapter.model)
    blocks_after = block_parameters([adapter.block(i) for i in range(adapter.n_layers)])
    return PipelineResult(records, params_before, after, target, timings, blocks_before, blocks_after, layout,
                          allocation, logit_scale, output_tensors)


_BLOCK_SEED_STRIDE = 1_000_003  # > any block count: (seed, block) pairs never collide


def _seed_block(seed: int, index: int) -> None:
    """Seed all RNGs from (seed, block index) before each block.

    Nothing in a block may depend on how many random numbers earlier blocks drew: a run resumed after
    block k must draw exactly what the uninterrupted run draws, so its output is byte-identical.
    """
    import random

    import numpy as np

    s = (seed * _BLOCK_SEED_STRIDE + index) % 2**63
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def _register_restored(acts, work: WorkDir, restored) -> None:
    """Memory-mapped streams of a restored checkpoint: delete their files once a later commit supersedes them."""
    spec = (work.state or {}).get("streams") or {}
    if spec.get("format") != "bin" or acts.mode != "disk":
        return
    for key, t in (("xp", restored.xp), ("xd", restored.xd)):
        if t is not None and spec.get(key):
            acts.register(t, work.path / spec[key]["file"])
