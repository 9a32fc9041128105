"""Importance criteria: the method's own scores and every peer baseline, one class each."""

from daprune.criteria.base import Criterion, available, get_criterion

__all__ = ["Criterion", "available", "get_criterion"]
