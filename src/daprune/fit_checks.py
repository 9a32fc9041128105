"""Settings a model family's blocks cannot honour, refused before any work (calibration, loading every block).

Each check names the setting, the block and why, and what to use instead: a setting that would be silently ignored
or ill-defined on these blocks is an error (experts, plain FFNs, norms between the FFN and the residual stream)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from daprune.block_ops import canonical
from daprune.criteria.base import get_criterion
from daprune.errors import ConfigError
from daprune.experts import check_moe_fit, is_moe

if TYPE_CHECKING:
    from daprune.config import PruneConfig
    from daprune.models.adapter import ModelAdapter


def check_criteria_fit(adapter: ModelAdapter, cfg: PruneConfig) -> None:
    """Refuse, before any work, a criterion or setting undefined for this family's blocks (plain FFNs, experts)."""
    check_moe_fit(adapter, cfg)
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


def refit_range(adapter: ModelAdapter, cfg: PruneConfig) -> range:
    """Blocks a re-fit may touch: the pruned range, and with ``--refit-unpruned`` every block after its start."""
    blocks = cfg.block_range(adapter.n_layers)
    return range(blocks.start, adapter.n_layers) if cfg.refit_unpruned else blocks
