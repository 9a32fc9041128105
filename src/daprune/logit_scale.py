"""One scale on the pruned model's logits, fitted to the dense model's next-token distribution (``--logit-scale fit``).

Why: a pruned model comes out over-confident. On SmolLM2-135M at 20% (``--preset quality``, seven seeds) the fitted
scale is 0.98 and lowers every held-out text and both test corpora on every seed, WikiText-2 by 1.1% on average
(89.86 -> 88.86; session 32, docs/quality.md). Least squares re-fits each block to the dense block's output, but what
the model is judged by is a softmax of the last one, and nothing else in the method looks at that.

The scale is fitted without labels (so it serves generated calibration text too): the one that minimises the mean KL
divergence of the pruned model's output distribution from the dense model's, on calibration rows both streams already
carry (every ``KL_POSITIONS_STRIDE``-th position, as the sensitivity pass reads them). The KL is convex in the scale
where the logits are linear in it; a log-spaced grid over [1/8, 8], zoomed three times, needs no such assumption
(soft-caps).
With held-out rows the scale is kept only if it also lowers their KL, as ``--recovery heldout`` keeps a re-fit.

The written model carries the scale in its own parameters: the final norm's gain (and bias, and an LM-head bias)
times the scale multiplies the logits by it exactly, so the output is the family's own architecture and costs
nothing at inference. Which form a norm's gain takes (``w`` or Gemma's ``1 + w``) is found by trying each and
checking the norm's output, so a norm of neither form is refused rather than scaled wrongly.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from daprune.allocation import KL_POSITIONS_STRIDE  # as the sensitivity pass reads the output distribution
from daprune.errors import ConfigError

LOGIT_SCALE_NSAMPLES = 128  # fit rows read: one scalar needs few (128 rows x 32 positions = 4,096 positions)
SPAN = 8.0  # the first grid spans [1/SPAN, SPAN], log-spaced
GRID_POINTS = 13  # in the first grid
ZOOM_POINTS = 9  # each zoom spans one step of the last grid either side of its best, in quarter steps
ZOOMS = 3  # the last step is about 0.5% of the scale


def mean_kl(adapter, hp: torch.Tensor, hd: torch.Tensor, scales: list[float], batch_size: int) -> list[float]:
    """Mean per-token KL(dense || pruned with its logits times s) for each s, over every KL_POSITIONS_STRIDE-th
    position of the last-layer hidden states ``hp`` (pruned stream) and ``hd`` (dense stream)."""
    raw, finish = adapter.raw_logits, adapter.finish_logits
    dev = adapter.model.get_output_embeddings().weight.device
    hp, hd = hp[:, ::KL_POSITIONS_STRIDE], hd[:, ::KL_POSITIONS_STRIDE]
    sums = torch.zeros(len(scales), dtype=torch.float64)
    count = 0
    with torch.no_grad():
        for s in range(0, hp.shape[0], batch_size):
            zp = raw(hp[s : s + batch_size].to(dev)).float()
            ld = torch.log_softmax(finish(raw(hd[s : s + batch_size].to(dev)).float()), -1)
            pd = ld.exp()
            neg_entropy = (pd * ld).sum().double()
            for k, sc in enumerate(scales):
                sums[k] += neg_entropy - (pd * torch.log_softmax(finish(sc * zp), -1)).sum().double()
            count += zp.shape[0] * zp.shape[1]
    return (sums / max(count, 1)).tolist()


def fit_scale(adapter, hp: torch.Tensor, hd: torch.Tensor, batch_size: int) -> tuple[float, dict[str, float]]:
    """The scale with the least mean KL on these rows, and every scale tried with its KL."""
    lo, hi, points = -math.log(SPAN), math.log(SPAN), GRID_POINTS
    tried: dict[float, float] = {}
    best = 1.0
    for _ in range(ZOOMS + 1):
        step = (hi - lo) / (points - 1)
        grid = [round(math.exp(lo + k * step), 6) for k in range(points)]
        grid = [g for g in dict.fromkeys([*grid, 1.0]) if g not in tried]
        tried.update(zip(grid, mean_kl(adapter, hp, hd, grid, batch_size), strict=True))
        best = min(tried, key=tried.get)
        lo = max(math.log(best) - step, -math.log(SPAN))
        hi = min(math.log(best) + step, math.log(SPAN))
        points = ZOOM_POINTS
    return best, {f"{s:g}": tried[s] for s in sorted(tried)}


def _gain_forms(w: torch.Tensor, s: float) -> list[torch.Tensor]:
    """A norm's gain as it may be stored: ``w`` itself, or Gemma's ``1 + w``; each scaled by ``s``."""
    return [w * s, (1 + w) * s - 1]


def scaled_tensors(adapter, s: float) -> dict[str, torch.Tensor]:
    """The parameters (by name) that make the model's logits ``s`` times what they are: the last module before the
    LM head (the final norm, or a projection after it) with its output times ``s``, and an LM-head bias times ``s``.
    Each norm form is checked on a random row; ConfigError where none gives exactly ``s`` times the output."""
    from daprune.weights import param_name

    model = adapter.model
    norm = adapter.final_norm()
    last = norm[-1] if isinstance(norm, nn.Sequential) else norm
    if last is None or getattr(last, "weight", None) is None:
        raise ConfigError("--logit-scale fit: this model has no final norm or projection with a gain before its LM "
                          "head to carry the scale")
    out: dict[str, torch.Tensor] = {}
    head = model.get_output_embeddings()
    if getattr(head, "bias", None) is not None:
        out[param_name(model, head.bias)] = head.bias.detach() * s
    w, b = last.weight, getattr(last, "bias", None)
    # a norm's gain and a projection's [out, in] weight both end in the width of what the module reads; a projection
    # passes the first form (its output is linear in its weight and bias)
    probe = torch.randn(2, w.shape[-1], generator=torch.Generator().manual_seed(0)).to(w.device, w.dtype)
    with torch.no_grad():
        want = last(probe) * s
        saved = w.detach().clone(), None if b is None else b.detach().clone()
        try:
            for form in _gain_forms(saved[0], s):
                w.copy_(form)
                if b is not None:
                    b.copy_(saved[1] * s)
                if torch.allclose(last(probe), want, rtol=1e-4, atol=1e-5 * float(want.abs().max())):
                    out[param_name(model, w)] = form
                    if b is not None:
                        out[param_name(model, b)] = saved[1] * s
                    return out
        finally:
            w.copy_(saved[0])
            if b is not None:
                b.copy_(saved[1])
    raise ConfigError(f"--logit-scale fit: the final {type(last).__name__} of this model is neither a plain gain nor "
                      "a (1 + w) gain, so a scale cannot be written into it")


def apply_tensors(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Write ``tensors`` (by parameter name) into ``model`` in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, t in tensors.items():
            params[name].copy_(t)


def fit_logit_scale(adapter, xp: torch.Tensor, xd: torch.Tensor, n_fit: int, batch_size: int
                    ) -> tuple[dict, dict[str, torch.Tensor]]:
    """Fit the scale on the first LOGIT_SCALE_NSAMPLES fit rows of the last-layer streams, judge it on the held-out
    rows (those after ``n_fit``), and return the report entry and the tensors that carry it ({} when it is not
    kept: no held-out gain, or a scale of 1)."""
    rows = min(n_fit, LOGIT_SCALE_NSAMPLES)
    scale, tried = fit_scale(adapter, xp[:rows], xd[:rows], batch_size)
    entry: dict = {"fitted": scale, "fit_rows": rows, "positions_stride": KL_POSITIONS_STRIDE, "kl_fit": tried}
    kept = scale != 1.0
    if xp.shape[0] > n_fit and kept:
        before, after = mean_kl(adapter, xp[n_fit:], xd[n_fit:], [1.0, scale], batch_size)
        entry["kl_heldout"] = {"1": before, f"{scale:g}": after}
        kept = after < before
    entry["scale"] = scale if kept else 1.0
    return entry, scaled_tensors(adapter, scale) if kept else {}
