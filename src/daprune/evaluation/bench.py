"""Placeholder: the `daprune bench` subcommand is being written (see the open issue)."""

from __future__ import annotations


def add_parser(sub) -> dict:
    return {}
