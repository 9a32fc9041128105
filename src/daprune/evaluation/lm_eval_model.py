"""lm-eval's ``HFLM``, computing vocabulary logits only at the positions lm-eval goes on to read.

Why: for every log-likelihood request ``HFLM`` runs the LM head and a float32 log-softmax over the
whole padded sequence, then keeps only the continuation's rows. On a small model the vocabulary
projection is a large part of the work (SmolLM2-135M: 49 152 x 576, a fifth of all multiply-adds per
token), and most tokens of a zero-shot request are context (a BoolQ passage scored for one answer
token). This subclass passes ``logits_to_keep`` to the model so that the head and the log-softmax see
only the trailing positions that hold some row's continuation.

On that path nothing else changes: batching, ordering, the one-token-continuation cache, the continuation
slicing, ``greedy`` checks and the request cache are lm-eval's own ``_loglikelihood_tokens``. That method
already handles logits that are shorter than the padded input (it offsets every row by
``logits.shape[1] - padding_len``), which is exactly what ``logits_to_keep`` returns.

With ``share_contexts`` (the default) the requests that share a context are instead scored as one packed
sequence (``shared_context``): a question with four answers runs its question once, not four times. The first
packed question of a run is checked against the path above and packing is switched off, with a warning, if
they disagree (a model class that ignores a 4D attention mask or position ids would).

This module imports lm-eval at the top: import it only where lm-eval is installed.
"""

from __future__ import annotations

import inspect
import logging
from typing import Any

import torch
from lm_eval.models.huggingface import HFLM
from tqdm.auto import tqdm

from daprune.evaluation.shared_context import Group, additive_mask, answer, group_requests, pack

log = logging.getLogger(__name__)

_PAD = 0  # lm-eval right-pads log-likelihood batches with token id 0 (``pad_and_concat``)


class ContinuationLogitsHFLM(HFLM):
    """``HFLM`` whose causal forward computes logits only from the earliest continuation in the batch.

    Args (besides HFLM's own):
        progress: False hides the per-request progress bar.
        trim_logits: False computes every position's logits (with ``share_contexts=False``: plain ``HFLM``), for
            comparisons.
        share_contexts: score the requests of one context as one packed sequence (see the module docstring);
            False, or a model this cannot apply to, scores every request on its own.
    """

    def __init__(self, *args: Any, progress: bool = True, trim_logits: bool = True, share_contexts: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.progress = progress
        self.trim_logits = trim_logits and self.backend == "causal" and _accepts_logits_to_keep(self.model)
        self.share_contexts = share_contexts and _can_pack(self)
        self._packing_checked = False
        self._cont_start: dict[tuple[int, ...], int] | None = None
        self.positions_computed = 0  # logits rows computed (batch x kept positions), for tests/benchmarks
        self.positions_total = 0  # rows plain HFLM would have computed
        self.tokens_run = 0  # input positions the model ran (padding included), on either path

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list:
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm or not self.progress)

    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, override_bs: int | None = None) -> list:
        if not self.share_contexts or override_bs is not None:
            return self._one_by_one(requests, disable_tqdm, override_bs)
        groups, plain = group_requests(requests, self.max_length)
        if self.sliding_window is not None:  # a packed sequence longer than the window would change what it sees
            plain += [i for g in groups if g.length > self.sliding_window for i in g.members]
            groups = [g for g in groups if g.length <= self.sliding_window]
        checked: dict[int, tuple[float, bool]] = {}
        if not self._packing_checked:
            agreed = self._packing_check(requests, groups)
            if agreed is None:
                return self._one_by_one(requests, disable_tqdm, override_bs)
            checked = agreed
        answers: list[tuple[float, bool] | None] = [None] * len(requests)
        if plain:
            for i, ans in zip(plain, self._one_by_one([requests[i] for i in plain], True, None), strict=True):
                answers[i] = ans
        bar = tqdm(total=len(requests), initial=len(plain), desc="Running loglikelihood requests (shared contexts)",
                   disable=disable_tqdm or not self.progress)
        groups = [g for g in groups if g.members[0] not in checked]  # the checked group is scored already
        groups.sort(key=lambda g: -g.length)  # like lm-eval: similar lengths share a batch, the longest first
        self._commit(requests, answers, list(checked.items()), bar)
        for s in range(0, len(groups), self.batch_size):
            batch = groups[s : s + self.batch_size]
            members = [i for g in batch for i in g.members]
            self._commit(requests, answers, list(zip(members, self._packed_answers(batch), strict=True)), bar)
        bar.close()
        return answers

    def _commit(self, requests: list, answers: list, scored: list[tuple[int, tuple[float, bool]]], bar) -> None:
        """Place scored answers and hand each to lm-eval's request cache, which commits them as they come."""
        for i, ans in scored:
            answers[i] = ans
            if requests[i][0] is not None:
                self.cache_hook.add_partial("loglikelihood", requests[i][0], ans)
        bar.update(len(scored))

    @property
    def sliding_window(self) -> int | None:
        window = getattr(self.model.config, "sliding_window", None)
        return window if isinstance(window, int) and window > 0 else None

    def _packed_answers(self, groups: list[Group]) -> list[tuple[float, bool]]:
        """Each member's (log-likelihood, greedy) of ``groups``, from one forward of their packed batch."""
        batch = pack(groups)
        dev = self.device
        keep = batch.input_ids.shape[1] - batch.first_read
        self.tokens_run += batch.input_ids.numel()
        kwargs = {"logits_to_keep": keep} if self.trim_logits else {}
        logits = self._logits(batch.input_ids.to(dev), position_ids=batch.position_ids.to(dev),
                              attention_mask=self._mask(batch.allowed.to(dev)), use_cache=False, **kwargs)
        logits = logits[:, logits.shape[1] - keep :]  # the positions from first_read on
        out: list[tuple[float, bool]] = []
        row, log_probs = -1, None
        for b, positions, tokens in batch.reads:
            if b != row:  # one row's log-softmax at a time: batch x positions x vocabulary would not fit
                row, log_probs = b, torch.log_softmax(logits[b].to(self.softmax_dtype), -1)
            out.append(answer(log_probs, [p - batch.first_read for p in positions], tokens))
        return out

    def _mask(self, allowed: torch.Tensor) -> torch.Tensor:
        """The 4D mask the model's attention takes as it is: boolean for SDPA (no dtype to match under
        autocast), additive in the model's dtype for eager attention, which adds it to the scores."""
        if self.model.config._attn_implementation == "sdpa":
            return allowed[:, None]
        return additive_mask(allowed, self.model.dtype)

    def _packing_check(self, requests: list, groups: list[Group]) -> dict[int, tuple[float, bool]] | None:
        """Compare the first group whose packing relies on the mask and position ids with scoring its requests
        one by one. Agreement gives that group's packed answers by request index (empty when no group relies
        on the mask); disagreement switches packing off for this model and gives None. The two differ by
        rounding (other shapes, other summation orders): per token about the compute dtype's epsilon, so the
        tolerance is 4 epsilon per token (at least 1e-4); a mask or positions the model ignored change more."""
        group = next((g for g in groups if g.needs_mask), None)
        if group is None:
            return {}
        self._packing_checked = True
        per_token = max(1e-4, 4 * torch.finfo(self.mixed_precision_dtype or self.model.dtype).eps)
        packed = self._packed_answers([group])
        plain = self._one_by_one([requests[i] for i in group.members], True, None)
        for (a, _), (b, _), ending in zip(packed, plain, group.endings, strict=True):
            if abs(a - b) > per_token * len(ending):
                log.warning("scoring shared contexts in one sequence disagrees with scoring each request on its own "
                            "for %s (%.4f against %.4f): scoring every request on its own",
                            type(self.model).__name__, a, b)
                self.share_contexts = False
                return None
        return dict(zip(group.members, packed, strict=True))

    def _one_by_one(self, requests: list, disable_tqdm: bool, override_bs: int | None) -> list:
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
        self.tokens_run += inps.numel()
        self.positions_computed += inps.shape[0] * (keep or inps.shape[1])
        if keep is None:
            return super()._model_call(inps, attn_mask=attn_mask, labels=labels)
        return self._logits(inps, logits_to_keep=keep)

    def _logits(self, inps: torch.Tensor, **kwargs: Any) -> torch.Tensor:
        """The model's logits without gradients, under HFLM's mixed precision when it has one (as
        ``HFLM._model_call``, which takes no extra model arguments)."""
        with (
            torch.no_grad(),
            torch.autocast(
                device_type=self.device.type,
                dtype=self.mixed_precision_dtype,
                enabled=self.mixed_precision_dtype is not None,
            ),
        ):
            return self.model(inps, **kwargs).logits


def _can_pack(lm: HFLM) -> bool:
    """Packing needs a causal model whose attention takes an additive 4D mask (eager or SDPA; flash attention
    takes none) and a fixed batch size (lm-eval's "auto" sizes batches of its own requests)."""
    impl = getattr(lm.model.config, "_attn_implementation", None)
    return lm.backend == "causal" and impl in ("eager", "sdpa") and isinstance(lm.batch_size, int)


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
