"""lm-eval's ``HFLM``, computing vocabulary logits only at the positions lm-eval goes on to read.

Why: for every log-likelihood request ``HFLM`` runs the LM head and a float32 log-softmax over the
whole padded sequence, then keeps only the continuation's rows. On a small model the vocabulary
projection is a large part of the work (SmolLM2-135M: 49 152 x 576, a fifth of all multiply-adds per
token), and most tokens of a zero-shot request are context (a BoolQ passage scored for one answer
token). This subclass passes ``logits_to_keep`` to the model so that the head and the log-softmax see
only the trailing positions that hold some row's continuation.

Nothing else changes: batching, ordering, the one-token-continuation cache, the continuation slicing,
``greedy`` checks and the request cache are lm-eval's own ``_loglikelihood_tokens``. That method
already handles logits that are shorter than the padded input (it offsets every row by
``logits.shape[1] - padding_len``), which is exactly what ``logits_to_keep`` returns.

This module imports lm-eval at the top: import it only where lm-eval is installed.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM

_PAD = 0  # lm-eval right-pads log-likelihood batches with token id 0 (``pad_and_concat``)


class ContinuationLogitsHFLM(HFLM):
    """``HFLM`` whose causal forward computes logits only from the earliest continuation in the batch.

    Args (besides HFLM's own):
        progress: False hides the per-request progress bar.
        trim_logits: False gives plain ``HFLM`` behaviour (every position's logits), for comparisons.
    """

    def __init__(self, *args: Any, progress: bool = True, trim_logits: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self.trim_logits = trim_logits and self.backend == "causal" and _accepts_logits_to_keep(self.model)
        self._cont_start: dict[tuple[int, ...], int] | None = None
        self.positions_computed = 0  # logits rows computed (batch x kept positions), for tests/benchmarks
        self.positions_total = 0  # rows plain HFLM would have computed

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list:
        # Map each request's model input (as lm-eval will build it: left-truncated to max_length + 1,
        # last token dropped) to the position of its first continuation token.
        self._cont_start = continuation_starts(requests, self.max_length) if self.trim_logits else None
        try:
            return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
        finally:
            self._cont_start = None

    def _model_call(
        self, inps: torch.Tensor, attn_mask: torch.Tensor | None = None, labels: torch.Tensor | None = None
    ) -> torch.Tensor:
        keep = None
        if self._cont_start is not None and attn_mask is None and labels is None:
            keep = logits_to_keep(inps, self._cont_start)
        self.positions_total += inps.shape[0] * inps.shape[1]
        self.positions_computed += inps.shape[0] * (keep or inps.shape[1])
        if keep is None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(inps, logits_to_keep=keep).logits


def _accepts_logits_to_keep(model: Any) -> bool:
    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def continuation_starts(requests: list, max_length: int) -> dict[tuple[int, ...], int]:
    """``{model input tokens: index of its first continuation token}`` for lm-eval's (key, ctx, cont) requests.

    Two requests with the same input keep the earlier start, so either one's continuation is covered.
    """
    starts: dict[tuple[int, ...], int] = {}
    for _, context, continuation in requests:
        inp = tuple((context + continuation)[-(max_length + 1) :][:-1])
        start = max(0, len(inp) - len(continuation))
        starts[inp] = min(start, starts.get(inp, start))
    return starts


def logits_to_keep(inps: torch.Tensor, cont_start: dict[tuple[int, ...], int]) -> int | None:
    """How many trailing positions of the right-padded batch hold every row's continuation.

    A row's true length is not known from the padded tensor when its last real token is the pad id,
    so every length from "trailing pads stripped" to the full width is looked up, and the earliest
    start among the matches is used: keeping more positions than needed is always correct. A row that
    matches no request gives None (compute everything), so an unexpected caller never gets fewer logits.
    """
    width = inps.shape[1]
    earliest = width
    for row in inps.tolist():
        stripped = len(row)
        while stripped > 0 and row[stripped - 1] == _PAD:
            stripped -= 1
        hits = [cont_start[key] for n in range(stripped, width + 1) if (key := tuple(row[:n])) in cont_start]
        if not hits:
            return None
        earliest = min(earliest, min(hits))
    keep = width - earliest
    return keep if 0 < keep < width else None
