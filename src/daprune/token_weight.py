"""``--token-weight``: how much each calibration token's output error counts.

``residual``: each token's output error counted as the next layer sees it.

A block's output is added to the residual stream, and the next block reads that stream through an RMSNorm,
which divides every token by its own root mean square. An output change dy at token t therefore moves what the
next layer sees by about dy / rms(h_t). Plain output energy counts dy alike at every token, so the few tokens
whose residual stream is large (attention sinks and their neighbours; in SmolLM2's blocks 2 and 9 the top 1% of
tokens carry a third to a half of the FFN input energy, benchmarks/token_energy.py) dominate statistics whose
errors the norm then shrinks. Weighting token t by w_t = 1 / mean(h_t^2), h_t the residual stream entering the
block, and scaling the weights to mean 1 over the statistics' rows, turns every second moment, Gram and cross
term into its w-weighted form (the rows are multiplied by sqrt(w_t)), so selection, compensation and re-fits
minimise the weighted error.

``first``: the first position of every row carries a fixed share of the row's weight (``--first-token-share``,
default 0.2, against 1/128 unweighted). Where each window starts with BOS (Gemma), that position's hidden state is
the same in every row and every later token attends to it (the attention sink); plain output energy sees one token
in 128 and lets pruning move it. Gemma-3 drives its FFN output there to nearly zero (mean square 1e-6 to 1e-3 of
the median token's in blocks 5-15), and the post-FFN norm divides by that small size, so an absolute change the
plain energy counts as negligible moves that state a lot. Restoring the dense BOS hidden state in every block of a
Gemma-3-270M pruned over all its blocks lowered WikiText-2 / PTB perplexity by 3% / 4% (a one-off probe, 16
windows): the error that weighting the first position makes selection and compensation avoid.

``gradient``: each token by how much the loss responds to its output, ||g_t||^2 with g_t the dense model's gradient
of the next-token loss at that block's o_proj (attention statistics) or down_proj (FFN statistics) output
(:func:`daprune.fisher.token_gradients`), so that a token whose prediction the output barely reaches counts little.
With ``--error-weight fisher`` this completes the loss's second-order weight g_td^2 of each token's error in each
dimension as a_t b_d (see token_gradients). On Gemma-3 it gives the BOS position 80-99% of the weight in blocks
5-17 (probe of 8 generated rows): the measured counterpart of ``first``'s fixed share.
"""

from __future__ import annotations

import torch

FIRST_TOKEN_SHARE = 0.2  # --token-weight first: the first position's share of each row's total weight (held-out
# LAMBADA on Gemma-3: 0.2 75.88, 0.5 76.29, 0.8 76.35, uniform (1/128) 81.86; docs/quality.md)


class TokenScale:
    """The per-token factor sqrt(w_t) of one block's statistics (w scaled to mean 1 over ``rows`` rows)."""

    def __init__(self, stream: torch.Tensor, rows: int, batch: int):
        total, count = 0.0, 0
        for s in range(0, rows, batch):
            w = self.raw(stream[s:min(s + batch, rows)])
            total += float(w.double().sum())
            count += w.numel()
        self.norm = total / max(count, 1)

    @staticmethod
    def raw(stream: torch.Tensor) -> torch.Tensor:
        """1 / mean square of each token's residual stream (fp32; a zero token gets the largest finite weight)."""
        ms = stream.float().pow(2).mean(-1)
        return 1.0 / ms.clamp_min(torch.finfo(torch.float32).tiny)

    def factors(self, stream: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        """sqrt(w_t) for each token of ``stream`` (one batch of the block's input, rows ``start``..): computed once per
        batch and applied, by :func:`scaled`, to every role's rows on those tokens: the same for the attention
        statistics ("o") and the FFN's ("down")."""
        f = (self.raw(stream) / self.norm).sqrt()
        return {"o": f, "down": f}


def scaled(rows: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """``rows`` [batch, seq, ...] (a linear's input or target on the tokens ``factor`` [batch, seq] belongs to)
    multiplied by that factor. The pipeline hands every capture over as rows (``block_ops.as_rows``: OPT's flat
    FFN too)."""
    f = factor.to(rows.device)
    if tuple(rows.shape[: f.dim()]) != tuple(f.shape):
        raise ValueError(f"token factor {tuple(f.shape)} does not match rows {tuple(rows.shape)}")
    return rows.float() * f.reshape(*f.shape, *([1] * (rows.dim() - f.dim())))


class FirstTokenScale:
    """``--token-weight first``: sqrt(w_t) with w = (seq - 1) share / (1 - share) at position 0 and 1 elsewhere (so
    the first position holds ``share`` of each row's weight), scaled to mean 1."""

    def __init__(self, share: float):
        self.share = share

    def factors(self, stream: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        rows, seq = stream.shape[:2]
        w = torch.ones(rows, seq, dtype=torch.float32, device=stream.device)
        if seq > 1:
            w[:, 0] = (seq - 1) * self.share / (1 - self.share)
        f = (w / w.mean()).sqrt()
        return {"o": f, "down": f}


class GradientTokenScale:
    """``--token-weight gradient``: sqrt(w_t) with w_t = ||g_t||^2 at the block's attention output ("o", for the
    attention statistics) or FFN output ("down", for the FFN's), from :func:`daprune.fisher.token_gradients` over every
    stream row, each scaled to mean 1 over the first ``rows`` rows (those the statistics see)."""

    def __init__(self, grads: dict[str, torch.Tensor], rows: int):
        self.w = {role: g.float() / g[:rows].double().mean().clamp_min(1e-30).float() for role, g in grads.items()}

    def factors(self, stream: torch.Tensor, start: int) -> dict[str, torch.Tensor]:
        rows, seq = stream.shape[:2]
        out = {}
        for role, w in self.w.items():
            part = w[start:start + rows]
            if tuple(part.shape) != (rows, seq):
                raise ValueError(f"token gradients cover {tuple(w.shape)} tokens, not rows {start}..{start + rows} "
                                 f"of {seq}")
            out[role] = part.to(stream.device).sqrt()
        return out


def token_scale(mode: str, stream: torch.Tensor, rows: int, batch: int, first_share: float | None = None,
                grads: dict[str, torch.Tensor] | None = None
                ) -> TokenScale | FirstTokenScale | GradientTokenScale | None:
    """The per-token factor of one block's statistics under ``--token-weight mode`` (None: every token alike);
    ``grads``: the block's token gradients (``gradient``)."""
    if mode == "gradient":
        if grads is None:
            raise ValueError("--token-weight gradient needs the block's token gradients")
        return GradientTokenScale(grads, rows)
    if mode == "residual":
        return TokenScale(stream, rows, batch)
    if mode == "first":
        return FirstTokenScale(FIRST_TOKEN_SHARE if first_share is None else first_share)
    if mode == "uniform":
        return None
    raise ValueError(f"unknown token weight {mode!r}")
