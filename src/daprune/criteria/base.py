"""The Importance interface: one small class per criterion, looked up by name.

A criterion turns a block's weights and statistics into scores (higher = more important = kept).
``needs`` tells the pipeline which statistics to collect, so a data-free criterion costs no
calibration passes beyond the ones the pipeline needs anyway.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from daprune.models.adapter import BlockAdapter
from daprune.stats import BlockStats

# Statistics a criterion can ask for; see BlockStats.
NEEDS = frozenset({"attn_in", "o_in", "ffn_in", "down_in", "attn_probs", "grads"})


class Criterion:
    """Scores FFN channels and/or attention heads of one block."""

    name: str = ""
    needs: frozenset[str] = frozenset()
    needs_cov: frozenset[str] = frozenset()  # roles whose full centred covariance (Moments.cov) the scores read
    data_free: bool = False
    gated_only: bool = False  # defined only for gated FFNs (SwiGLU / GeGLU: a gate and an up projection)

    def __init__(self, seed: int = 0, **options):
        self.seed = seed
        self.options = options

    def ffn_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        raise NotImplementedError(f"criterion {self.name!r} does not score FFN channels")

    def head_scores(self, block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
        raise NotImplementedError(f"criterion {self.name!r} does not score attention heads")

    def after_ffn_prune(self, block: BlockAdapter, removed: Sequence[int], stats: BlockStats) -> None:
        """Hook for compensation (FLAP adds the removed channels' mean contribution as a bias)."""

    def after_head_prune(self, block: BlockAdapter, removed: Sequence[int], stats: BlockStats) -> None:
        """Hook for compensation on the attention output."""

    def describe(self) -> dict:
        return {"name": self.name, **self.options}


_CRITERIA: dict[str, type[Criterion]] = {}


def register(cls: type[Criterion]) -> type[Criterion]:
    _CRITERIA[cls.name] = cls
    return cls


def available() -> list[str]:
    _load_all()
    return sorted(_CRITERIA)


def get_criterion(name: str, **options) -> Criterion:
    _load_all()
    if name not in _CRITERIA:
        from daprune.errors import ConfigError

        raise ConfigError(f"unknown criterion {name!r}; available: {', '.join(sorted(_CRITERIA))}")
    return _CRITERIA[name](**options)


def _load_all() -> None:
    import importlib
    import pkgutil

    import daprune.criteria as pkg

    for mod in pkgutil.iter_modules(pkg.__path__):
        if mod.name != "base":
            importlib.import_module(f"daprune.criteria.{mod.name}")


# -- helpers shared by criteria --------------------------------------------------------------------------
def head_blocks(weight: torch.Tensor, head_dim: int, dim: int) -> torch.Tensor:
    """View a q rows (dim=0) or o columns (dim=1) weight as [heads, head_dim, other]."""
    w = weight if dim == 0 else weight.T
    return w.reshape(-1, head_dim, w.shape[1])


def head_columns(heads: Sequence[int], head_dim: int) -> torch.Tensor:
    """The o_proj input columns of ``heads`` (each head owns ``head_dim`` consecutive columns)."""
    return torch.tensor([h * head_dim + d for h in heads for d in range(head_dim)], dtype=torch.long)


def o_head_second_moment(block: BlockAdapter, stats: BlockStats) -> torch.Tensor:
    """E||z_h W_o[:, h]^T||^2 per head: the exact energy each head adds to the attention output (under
    ``--error-weight fisher`` with each output dimension weighted by the loss's sensitivity to it)."""
    from daprune.fisher import weighted_rows

    w = weighted_rows(block.attn_out().weight.float(), stats.output_weight.get("o"))
    second = stats.o_in.second
    hd = block.head_dim
    scores = []
    for h in range(block.n_heads):
        sl = slice(h * hd, (h + 1) * hd)
        wh = w[:, sl]
        scores.append(torch.einsum("oi,ij,oj->", wh, second[sl, sl], wh))
    return torch.stack(scores)
