"""Calibration rows whose second half repeats their first (``--copy-rows FRACTION``, opt-in).

Why: a language model predicts much of a text by copying from its own context (a name, a phrase, a passage it was
given), and natural calibration text asks little of that: a 128-token row seldom repeats itself, so nothing the
method measures sees a prune that breaks it. Every 512-row ``--preset quality`` prune of SmolLM2-135M at 20% copies
a repeated 64-token segment of held-out Wikipedia worse than the dense model (NLL on the second copy 0.91-1.38 nats
against 0.57; benchmarks/copy_probe.py, session 33). A row that repeats itself makes the copying measurable: on its
second half the dense model is nearly certain, so a block whose pruning breaks copying costs KL in the allocation's
sensitivity pass and error in every least-squares fit. With a quarter of the rows so made, three seeds copy nearly
as well as dense (0.64-0.67) and pay 0.6-4% on held-out natural text (docs/quality.md): a trade
for users whose prompts quote their context, not the preset's default.

The chosen rows are spread evenly over the calibration (row r when floor((r + 1) f) > floor(r f)), so a mixture's
parts share them in turn; their first half is kept and their second half is the first half again, after a
leading BOS, if the row starts with one.
"""

from __future__ import annotations

import torch


def chosen_rows(nrows: int, fraction: float) -> list[int]:
    """The rows that become copies: ``round(nrows * fraction)`` of them, as evenly spread as integers allow."""
    return [r for r in range(nrows) if int((r + 1) * fraction + 1e-9) > int(r * fraction + 1e-9)]


def record(nrows: int, seqlen: int, fraction: float) -> dict:
    """What report.json ``calibration.copy_rows`` says of rows of this shape (the same for fresh and resumed runs)."""
    return {"fraction": fraction, "rows": len(chosen_rows(nrows, fraction)), "of": nrows, "repeat_from": seqlen // 2,
            "how": "the row's first half again from position seqlen // 2 (after a leading BOS)"}


def repeated(ids: torch.Tensor, bos_token_id: int | None) -> torch.Tensor:
    """Every row of ``ids`` with its second half its first again (after a leading BOS): the KL-only rows of
    ``--sensitivity-copy-rows``."""
    return copy_halves(ids, 1.0, bos_token_id)[0]


def copy_halves(ids: torch.Tensor, fraction: float, bos_token_id: int | None) -> tuple[torch.Tensor, dict]:
    """``ids`` [rows, seqlen] with the chosen rows' second half replaced by their first half (after a leading BOS),
    and their record. The fraction and the row length were checked by PruneConfig.validate before any work."""
    seqlen = ids.shape[1]
    out = ids.clone()
    half = seqlen // 2
    for r in chosen_rows(ids.shape[0], fraction):
        start = 1 if bos_token_id is not None and int(ids[r, 0]) == bos_token_id else 0
        out[r, half:] = ids[r, start : start + seqlen - half]
    return out, record(ids.shape[0], seqlen, fraction)
