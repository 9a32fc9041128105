"""How much each output dimension of a block's level-2 linears matters to the model's loss (``--error-weight fisher``).

Selection minimises the energy a removed set takes out of the o_proj / down_proj output, E||dy||^2, which counts
every hidden dimension alike. The loss does not: a norm after the linear (Gemma's post-norms) rescales the output,
massive-activation dimensions are normalised away downstream, and some dimensions feed the logits far more than
others. The second-order change of the next-token loss for a small change dy of that output is, with the
Fisher in place of the Hessian and only its diagonal kept, sum_d E[g_d^2] dy_d^2, g = dL/dy the gradient at that
output. So the weight of dimension d is F_d = E[g_d^2]; weighting the rows of the output weight by sqrt(F_d) turns
every output energy the pipeline computes (greedy and OBS selection, the head/FFN split, head scores) into this
loss estimate. Least-squares compensation fits each output row on its own, so it is unchanged.

One forward and backward pass of the dense model over the scoring calibration rows, before pruning (as LLM-Pruner's
Taylor scores need), gives every block's weights; they are computed on the dense model and used for the
sequentially pruned one, the same approximation the Taylor criteria make.
"""

from __future__ import annotations

import torch

from daprune.backward import frozen_for_gradients, next_token_backward
from daprune.errors import ConfigError
from daprune.models.adapter import ModelAdapter

ROLES = ("o", "down")


def output_fisher(model: torch.nn.Module, adapter: ModelAdapter, ids: torch.Tensor, batch_size: int = 8,
                  progress: bool = True) -> dict[int, dict[str, torch.Tensor]]:
    """Per block, per role ("o": the attention output linear, "down": the FFN output linear), E[g_d^2] over every
    token of ``ids`` [n, seqlen], g the gradient of the summed next-token NLL at that linear's output (fp32, CPU).

    Each role's weights are scaled to mean 1: they redistribute an output's error over its dimensions but leave
    the attention output's total against the FFN output's as the unweighted error has it. Kept at their own scale
    (the Fisher's estimate of the loss), they made the head/FFN split cut up to 3 of Gemma-3's 4 heads per block and
    the model collapse (held-out LAMBADA 399 against 88; docs/quality.md): removing a head is no small change of
    a post-normed output, where a second-order estimate stops holding.
    Only the input embeddings' output is made to require a gradient (no weight gradients are formed); every
    parameter's ``requires_grad`` is restored afterwards.
    """
    blocks = [adapter.block(i) for i in range(adapter.n_layers)]
    acc: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []

    def watch(key: tuple[int, str]):
        def forward_hook(_module, _inputs, out):
            def grad_hook(g: torch.Tensor) -> None:
                sq = g.detach().float().pow(2).reshape(-1, g.shape[-1]).sum(0).cpu()
                acc[key] = acc[key] + sq if key in acc else sq
            if out.requires_grad:
                out.register_hook(grad_hook)
        return forward_hook

    with frozen_for_gradients(model):
        try:
            for b in blocks:
                hooks.append(b.attn_out().register_forward_hook(watch((b.index, "o"))))
                hooks.append(b.ffn_out().register_forward_hook(watch((b.index, "down"))))
            hooks.append(model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_()))
            next_token_backward(model, ids, batch_size, desc="loss sensitivity (fisher)", progress=progress)
        finally:
            for h in hooks:
                h.remove()
    missing = [f"block {i} {role}" for i in range(adapter.n_layers) for role in ROLES if (i, role) not in acc]
    if missing:  # a module the adapter names but the forward never runs: weighting would silently not happen
        raise ConfigError(f"--error-weight fisher: no gradient reached {', '.join(missing[:3])} of this "
                          f"{adapter.config.model_type} model; use --error-weight uniform")
    out: dict[int, dict[str, torch.Tensor]] = {}
    for (i, role), v in acc.items():
        # floored so the compensated weights can be divided back out (a weight of 0 would erase its row)
        out.setdefault(i, {})[role] = (v / v.mean().clamp_min(1e-30)).clamp_min(1e-8)
    return out


def weighted_rows(weight: torch.Tensor, fisher: torch.Tensor | None) -> torch.Tensor:
    """``weight`` [out, in] with row d scaled by sqrt(F_d): its output energies become the loss estimate.
    None: unchanged (``--error-weight uniform``)."""
    if fisher is None:
        return weight
    return weight * fisher.sqrt().to(weight.device, weight.dtype)[:, None]
