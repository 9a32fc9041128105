"""Placeholder: the `daprune compare` subcommand is being written (see the open issue)."""

from __future__ import annotations


def add_parser(sub) -> dict:
    return {}
