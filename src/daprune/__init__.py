"""daprune: one-shot, structured, distribution-aware pruning of Hugging Face causal LMs.

Public API: :func:`prune`, :func:`load`, :func:`evaluate`. Heavy modules import lazily, so
``import daprune`` stays cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"

__all__ = ["PruneConfig", "prune", "load", "evaluate", "__version__"]


def __getattr__(name: str):
    if name == "PruneConfig":
        from daprune.config import PruneConfig

        return PruneConfig
    if name == "prune":
        from daprune.api import prune

        return prune
    if name == "load":
        from daprune.loader import load_pruned

        return load_pruned
    if name == "evaluate":
        from daprune.evaluation.perplexity import evaluate

        return evaluate
    raise AttributeError(name)
