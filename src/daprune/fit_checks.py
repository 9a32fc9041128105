"""Settings a model family's blocks cannot honour, refused before any work (calibration, loading every block).

Each check names the setting, the block and why, and what to use instead: a setting that would be silently ignored
or ill-defined on these blocks is an error (experts, plain FFNs, norms between the FFN and the residual stream)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from daprune.block_ops import canonical, read_canonical
from daprune.config import OBS_DAMP, OBS_MIN_TOKENS_PER_CHANNEL
from daprune.criteria.base import get_criterion
from daprune.errors import ConfigError
from daprune.experts import check_moe_fit, is_moe

if TYPE_CHECKING:
    from daprune.config import PruneConfig
    from daprune.models.adapter import ModelAdapter


def check_criteria_fit(adapter: ModelAdapter, cfg: PruneConfig) -> None:
    """Refuse, before any work, a criterion or setting undefined for this family's blocks (plain FFNs, experts)."""
    check_moe_fit(adapter, cfg)
    check_obs_damp_used(adapter, cfg)
    if cfg.kv_groups:
        check_kv_groups_read(adapter, cfg.block_range(adapter.n_layers))
    if cfg.token_weight != "uniform":
        for i in cfg.block_range(adapter.n_layers):
            block = adapter.block(i)
            if is_moe(block):
                raise ConfigError(f"--token-weight {cfg.token_weight} weights each token's rows, but this "
                                  f"{adapter.config.model_type} model's experts (block {i}) each see only the tokens "
                                  "routed to them: drop it for this model")
            if cfg.token_weight == "residual" and block.ffn_output_scale() is None:
                raise ConfigError(
                    f"--token-weight {cfg.token_weight} counts a token's output error as the next layer's norm of "
                    f"the residual stream sees it, which holds where a block's outputs are added to that stream as "
                    f"they are; this {adapter.config.model_type} model (block {i}) normalises them first (or does "
                    "not say): drop it for this model")
    refitted = refit_range(adapter, cfg)
    if cfg.refit_unpruned:
        for i in refitted:
            if is_moe(adapter.block(i)):
                raise ConfigError(f"--refit-unpruned re-fits the linears of blocks left whole, but this "
                                  f"{adapter.config.model_type} model's block {i} routes tokens to experts: drop it "
                                  "for this model")
    if cfg.recovery_target == "block":
        for i in refitted:
            if not adapter.block(i).ffn_output_gain_known():
                raise ConfigError(f"--recovery-target block re-fits down_proj to the dense block's output, but this "
                                  f"{adapter.config.model_type} model (block {i}) does not say how its FFN output "
                                  "reaches the block output (experts, post-LN): use --recovery-target linear")
            if cfg.heldout_strength == "per-output" and adapter.block(i).ffn_output_scale() is None:
                raise ConfigError(f"--heldout-strength per-output chooses each output row's strength by its own "
                                  f"held-out error, but this {adapter.config.model_type} model (block {i}) normalises "
                                  "its FFN output before the block output, which couples the rows of the "
                                  "--recovery-target block re-fit: use --heldout-strength shared, or --recovery-target "
                                  "linear")
    names = [cfg.ffn_criterion] + ([cfg.head_criterion] if cfg.head_criterion not in ("similarity", "none") else [])
    gated = [n for n in names if get_criterion(n).gated_only]
    if not gated:
        return
    for i in cfg.block_range(adapter.n_layers):
        block = canonical(adapter, i)
        plain = not block.gated
        block.to_native()
        if plain:
            raise ConfigError(f"criterion {gated[0]!r} is defined for gated FFNs (SwiGLU/GeGLU) only, but the "
                              f"FFN of this {adapter.config.model_type} model is plain (one input projection); "
                              "use --ffn-criterion second-moment (the same idea on the FFN output's real input)")


def check_obs_damp_used(adapter: ModelAdapter, cfg: PruneConfig) -> None:
    """``--obs-damp`` damps the OBS least-squares solves (FFN selection, ``--compensate-heads``). Under the default
    ``--selection auto`` OBS runs on a block only with ``OBS_MIN_TOKENS_PER_CHANNEL`` calibration tokens per FFN
    channel; when no pruned block can reach that (the bound is nsamples x seqlen), a changed damping changes
    nothing, and is refused rather than ignored. Expert blocks count their routed tokens, so they are let through."""
    if cfg.obs_damp == OBS_DAMP or cfg.compensate_heads or cfg.sparsity == 0:
        return
    rule = cfg.ffn_selection()
    if rule == "obs":
        return
    tokens = cfg.nsamples * cfg.seqlen
    if rule == "auto" and any(is_moe(adapter.block(i)) or tokens >= OBS_MIN_TOKENS_PER_CHANNEL *
                              read_canonical(adapter, i, lambda b: b.n_channels)
                              for i in cfg.block_range(adapter.n_layers)):
        return
    if rule != "auto" and cfg.selection == "auto":  # a chosen criterion turned "auto" into "score"
        raise ConfigError(f"--obs-damp damps OBS compensation, and --ffn-criterion {cfg.ffn_criterion} chooses the "
                          "channels by its own score, without OBS: drop --obs-damp, or use --compensate-heads or "
                          "--ffn-criterion second-moment")
    why = (f"--selection {rule} uses no OBS" if rule != "auto" else
           f"--selection auto uses OBS only with {OBS_MIN_TOKENS_PER_CHANNEL} calibration tokens per FFN channel, "
           f"and {cfg.nsamples} x {cfg.seqlen} tokens are fewer than that for every pruned block of this model")
    raise ConfigError(f"--obs-damp damps OBS compensation, and {why}: drop --obs-damp, or give more --nsamples, "
                      "--selection obs or --compensate-heads")


def check_kv_groups_read(adapter: ModelAdapter, blocks: range) -> None:
    """``--kv-groups`` lets GQA blocks drop whole KV groups; where every block has one query head per KV head,
    every removed head is a whole group already and the setting changes nothing: refused."""
    if all(read_canonical(adapter, i, lambda b: b.group_size) == 1 for i in blocks):
        raise ConfigError(f"--kv-groups lets GQA blocks drop whole KV groups; this {adapter.config.model_type} "
                          "model's pruned blocks have one query head per KV head, where every removed head is a "
                          "whole group anyway: drop it")


def refit_range(adapter: ModelAdapter, cfg: PruneConfig) -> range:
    """Blocks a re-fit may touch: the pruned range, and with ``--refit-unpruned`` every block after its start."""
    blocks = cfg.block_range(adapter.n_layers)
    return range(blocks.start, adapter.n_layers) if cfg.refit_unpruned else blocks
