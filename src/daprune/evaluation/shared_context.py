"""Score every answer of a multiple-choice question in one sequence: the question once, each answer after it.

Why: lm-eval scores a question with four answers as four sequences, so the model runs the question four times.
On HellaSwag (about 10,000 questions, a context of a few dozen tokens, four endings of about twenty) that is
most of a zero-shot run's work, and ARC and OpenBookQA repeat the pattern. Here the requests that share a
context become one packed sequence, the context followed by every ending with its last token dropped, with an
attention mask under which each ending sees the whole context and itself only, and position ids that restart
every ending where the context ends. Each ending's tokens then have exactly the inputs, positions and visible
keys they have in lm-eval's own sequence, so the log-likelihoods are the same up to floating-point rounding.

This module only builds the packed batches and reads answers off log-probabilities; the lm-eval model class
(``lm_eval_model``) decides when packing applies and runs the model.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Group:
    """Requests with one context: ``members`` (their indices in the request list) and their continuations."""

    context: tuple[int, ...]
    members: tuple[int, ...]
    endings: tuple[tuple[int, ...], ...]

    @property
    def length(self) -> int:
        """Tokens of the packed sequence: the context, then each ending without its last token."""
        return len(self.context) + sum(len(e) - 1 for e in self.endings)

    @property
    def needs_mask(self) -> bool:
        """Whether the packed sequence is one no plain request gives: two endings have input tokens, so the
        second's must be hidden from the first and its positions restarted. Otherwise the packed sequence is
        the context followed by at most one ending, scored right whatever mask the model applies."""
        return sum(len(e) > 1 for e in self.endings) >= 2


def group_requests(requests: Sequence[tuple], max_length: int) -> tuple[list[Group], list[int]]:
    """lm-eval's ``(key, context, continuation)`` requests grouped by context, and the indices of the rest.

    A request stays out of every group (scored the plain way) when lm-eval would left-truncate it (context and
    continuation longer than ``max_length + 1`` tokens: the dropped tokens depend on the continuation, so its
    context is not the shared one) or when its context or continuation is empty.
    """
    members: dict[tuple[int, ...], list[int]] = {}
    plain: list[int] = []
    for i, (_, context, continuation) in enumerate(requests):
        if not context or not continuation or len(context) + len(continuation) > max_length + 1:
            plain.append(i)
        else:
            members.setdefault(tuple(context), []).append(i)
    groups = [Group(ctx, tuple(idx), tuple(tuple(requests[i][2]) for i in idx)) for ctx, idx in members.items()]
    return groups, plain


@dataclass
class Packed:
    """A right-padded batch of packed groups.

    ``reads[r]``: for the r-th request of the batch (groups in order, members in order), its batch row, the
    positions whose next-token distribution scores each continuation token, and those tokens.
    """

    input_ids: torch.Tensor  # [B, T]
    position_ids: torch.Tensor  # [B, T]
    allowed: torch.Tensor  # [B, T, T] bool: query t may attend to key s
    first_read: int  # the earliest position any row reads: the logits before it are never needed
    reads: list[tuple[int, list[int], list[int]]]


def pack(groups: Sequence[Group], pad_id: int = 0) -> Packed:
    """Build the packed batch of ``groups`` (see the module docstring)."""
    width = max(g.length for g in groups)
    ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    pos = torch.zeros((len(groups), width), dtype=torch.long)
    allowed = torch.zeros((len(groups), width, width), dtype=torch.bool)
    # padding positions see only themselves: no row of the mask is empty (softmax over nothing gives NaN)
    allowed[:, torch.arange(width), torch.arange(width)] = True
    reads: list[tuple[int, list[int], list[int]]] = []
    first_read = width
    for b, g in enumerate(groups):
        n = len(g.context)
        ids[b, :n] = torch.tensor(g.context)
        pos[b, :n] = torch.arange(n)
        allowed[b, :n, :n] = torch.ones(n, n, dtype=torch.bool).tril()
        first_read = min(first_read, n - 1)
        start = n
        for ending in g.endings:
            k = len(ending) - 1  # the last token is only read, never an input
            if k:
                seg = slice(start, start + k)
                ids[b, seg] = torch.tensor(ending[:-1])
                pos[b, seg] = torch.arange(n, n + k)
                allowed[b, seg, :n] = True
                allowed[b, seg, seg] = torch.ones(k, k, dtype=torch.bool).tril()
            # token 0 is predicted at the context's last position, token j > 0 at the ending's (j-1)-th input
            reads.append((b, [n - 1, *range(start, start + k)], list(ending)))
            start += k
    return Packed(ids, pos, allowed, first_read, reads)


def additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``[B, 1, T, T]`` mask to add to attention scores: 0 where allowed, the dtype's minimum elsewhere.

    transformers passes a 4D mask through unchanged, and both its eager and its SDPA attention accept an
    additive float mask (eager adds it; SDPA takes it as ``attn_mask``).
    """
    mask = torch.zeros(allowed.shape, dtype=dtype, device=allowed.device)
    return mask.masked_fill_(~allowed, torch.finfo(dtype).min)[:, None]


def answer(log_probs: torch.Tensor, positions: list[int], tokens: list[int]) -> tuple[float, bool]:
    """``(sum of log p(token), every token greedy)`` from one row's log-probabilities [positions, vocab]."""
    rows = log_probs[positions]
    target = torch.tensor(tokens, device=rows.device)
    logp = rows.gather(1, target[:, None]).sum()
    return float(logp), bool((rows.argmax(-1) == target).all())
