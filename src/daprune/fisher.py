"""How much each output dimension of a block's level-2 linears matters to the model's loss (``--error-weight fisher``).

Selection minimises the energy a removed set takes out of the o_proj / down_proj output, E||dy||^2, which counts
every hidden dimension alike. The loss does not: a norm after the linear (Gemma's post-norms) rescales the output,
massive-activation dimensions are normalised away downstream, and some dimensions feed the logits far more than
others. The second-order change of the next-token loss for a small change dy of that output is, with the
Fisher in place of the Hessian and only its diagonal kept, sum_d E[g_d^2] dy_d^2, g = dL/dy the gradient at that
output. So the weight of dimension d is F_d = E[g_d^2]; weighting the rows of the output weight by sqrt(F_d) turns
every output energy the pipeline computes (greedy and OBS selection, the head/FFN split, head scores) into this
loss estimate. Least-squares compensation fits each output row on its own, so it is unchanged.

``--error-weight kfac`` keeps the whole matrix G = E[g g^T] instead of its diagonal: the loss change becomes
E[dy^T G dy], and a removed set's cost tr(dW A dW^T G) with A the input's second moment, the Kronecker-factored
(K-FAC) Fisher of the linear's weights, the curvature LLM Surgeon prunes with. The rows are mixed by G^(1/2) instead
of scaled. Compensation is still unchanged: the OBS update of the kept columns for a removed one is the same for
any output factor (every row is moved by the same input-side solve).

One forward and backward pass of the dense model over the scoring calibration rows, before pruning (as LLM-Pruner's
Taylor scores need), gives every block's weights; they are computed on the dense model and used for the
sequentially pruned one, the same approximation the Taylor criteria make.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from daprune.backward import blockwise_next_token_backward, frozen_for_gradients, next_token_backward
from daprune.errors import ConfigError
from daprune.models.adapter import BlockAdapter, ModelAdapter

if TYPE_CHECKING:
    from daprune.stores import ResidentStore

ROLES = ("o", "down")


class _Accumulator:
    """Sums g^2 (``full``: g g^T) over tokens at every block's output linears, from gradient hooks."""

    def __init__(self, full: bool):
        self.full = full
        self.acc: dict[tuple[int, str], torch.Tensor] = {}

    def watch(self, block: BlockAdapter) -> list:
        """Forward hooks on ``block``'s o_proj / down_proj that hook the gradient of their outputs."""
        def watcher(key: tuple[int, str]):
            def forward_hook(_module, _inputs, out):
                if out.requires_grad:
                    out.register_hook(lambda g: self.take(key, g.detach().float()))
            return forward_hook
        return [block.attn_out().register_forward_hook(watcher((block.index, "o"))),
                block.ffn_out().register_forward_hook(watcher((block.index, "down")))]

    def take(self, key: tuple[int, str], g: torch.Tensor) -> None:
        """One batch's gradient [b, seq, hidden] at one linear's output, summed over its tokens."""
        flat = g.reshape(-1, g.shape[-1])
        sq = (flat.T @ flat if self.full else flat.pow(2).sum(0)).cpu()
        self.acc[key] = self.acc[key] + sq if key in self.acc else sq

    def seen(self) -> set[tuple[int, str]]:
        """The (block, role) outputs a gradient reached."""
        return set(self.acc)

    def check_complete(self, adapter: ModelAdapter, setting: str, instead: str) -> None:
        """A module the adapter names but the forward never runs: the weighting would silently not happen."""
        seen = self.seen()
        missing = [f"block {i} {role}" for i in range(adapter.n_layers) for role in ROLES if (i, role) not in seen]
        if missing:
            raise ConfigError(f"{setting}: no gradient reached {', '.join(missing[:3])} of this "
                              f"{adapter.config.model_type} model; use {instead}")

    def weights(self, adapter: ModelAdapter) -> dict[int, dict[str, torch.Tensor]]:
        """Every block's weights by role, each scaled to mean 1 (see :func:`output_fisher`)."""
        self.check_complete(adapter, f"--error-weight {'kfac' if self.full else 'fisher'}", "--error-weight uniform")
        out: dict[int, dict[str, torch.Tensor]] = {}
        for (i, role), v in self.acc.items():
            scale = (torch.diagonal(v) if self.full else v).mean().clamp_min(1e-30)
            # the diagonal floored so the compensated weights can be divided back out (a weight of 0 would erase
            # its row); the matrix's eigenvalues are floored the same way where it is factored (OutputWeight)
            out.setdefault(i, {})[role] = v / scale if self.full else (v / scale).clamp_min(1e-8)
        return out


class _TokenAccumulator(_Accumulator):
    """Keeps ||g_t||^2, each token's squared gradient norm at every block's output linears, row by row."""

    def __init__(self):
        super().__init__(full=False)
        self.parts: dict[tuple[int, str], list[torch.Tensor]] = {}

    def take(self, key: tuple[int, str], g: torch.Tensor) -> None:
        # flat per batch: OPT's FFN runs on [batch * seq, hidden], the others on [batch, seq, hidden]
        self.parts.setdefault(key, []).append(g.pow(2).sum(-1).reshape(-1).cpu())

    def seen(self) -> set[tuple[int, str]]:
        return set(self.parts)

    def token_weights(self, adapter: ModelAdapter, shape: torch.Size) -> dict[int, dict[str, torch.Tensor]]:
        """Per block and role, [rows, seqlen] (``shape``, the ids') in the order of the ids (unscaled: the pipeline
        scales them to mean 1 over the rows its statistics see)."""
        self.check_complete(adapter, "--token-weight gradient", "another --token-weight")
        out: dict[int, dict[str, torch.Tensor]] = {}
        for (i, role), parts in self.parts.items():
            out.setdefault(i, {})[role] = torch.cat(parts).reshape(shape)
        return out


def _gradient_pass(acc: _Accumulator, adapter: ModelAdapter, ids: torch.Tensor, batch_size: int, progress: bool,
                   desc: str, model: torch.nn.Module | None = None, store: ResidentStore | None = None) -> None:
    """One backward of the summed next-token NLL over ``ids`` with ``acc`` hooked on every block: through the whole
    ``model``, or through a block ``store`` one block in memory at a time (gradient checkpointing, block by block)."""
    if store is not None:
        blockwise_next_token_backward(adapter, store, ids, batch_size, watch=acc.watch, desc=desc, progress=progress)
        return
    hooks = []
    with frozen_for_gradients(model):
        try:
            for i in range(adapter.n_layers):
                hooks += acc.watch(adapter.block(i))
            hooks.append(model.get_input_embeddings().register_forward_hook(lambda _m, _i, out: out.requires_grad_()))
            next_token_backward(model, ids, batch_size, desc=desc, progress=progress)
        finally:
            for h in hooks:
                h.remove()


def output_fisher(model: torch.nn.Module, adapter: ModelAdapter, ids: torch.Tensor, batch_size: int = 8,
                  progress: bool = True, full: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """Per block, per role ("o": the attention output linear, "down": the FFN output linear), E[g_d^2] over every
    token of ``ids`` [n, seqlen], g the gradient of the summed next-token NLL at that linear's output (fp32, CPU);
    ``full``: the matrix E[g g^T] [hidden, hidden] instead (``--error-weight kfac``).

    Each role's weights (the matrix's diagonal) are scaled to mean 1: they redistribute an output's error over its
    dimensions but leave the attention output's total against the FFN output's as the unweighted error has it.
    Kept at their own scale (the Fisher's estimate of the loss), they made the head/FFN split cut up to 3 of
    Gemma-3's 4 heads per block and the model collapse (held-out LAMBADA 399 against 88; docs/quality.md): removing
    a head is no small change of a post-normed output, where a second-order estimate stops holding.
    Only the input embeddings' output is made to require a gradient (no weight gradients are formed); every
    parameter's ``requires_grad`` is restored afterwards.
    """
    acc = _Accumulator(full)
    _gradient_pass(acc, adapter, ids, batch_size, progress, "loss sensitivity (fisher)", model=model)
    return acc.weights(adapter)


def streamed_output_fisher(adapter: ModelAdapter, store: ResidentStore, ids: torch.Tensor, batch_size: int = 8,
                           progress: bool = True, full: bool = False) -> dict[int, dict[str, torch.Tensor]]:
    """:func:`output_fisher` through a block store, one block in memory at a time (``--streaming``).

    The same gradient hooks on every block's output linears, through
    :func:`daprune.backward.blockwise_next_token_backward` (gradient checkpointing, block by block).
    """
    acc = _Accumulator(full)
    _gradient_pass(acc, adapter, ids, batch_size, progress, "loss sensitivity (fisher)", store=store)
    return acc.weights(adapter)


def token_gradients(adapter: ModelAdapter, ids: torch.Tensor, batch_size: int = 8, progress: bool = True, *,
                    model: torch.nn.Module | None = None, store: ResidentStore | None = None
                    ) -> dict[int, dict[str, torch.Tensor]]:
    """``--token-weight gradient``: per block and role ("o", "down"), ||g_t||^2 for every token of ``ids`` [n, seqlen]
    ([n, seqlen], fp32, CPU), g_t the gradient of the summed next-token NLL at that linear's output at token t, through
    the whole ``model`` or a block ``store`` (``--streaming``). The last position of a row has no next token to predict
    and gets 0: its output reaches no loss inside the window.

    Why: the diagonal Fisher of ``--error-weight fisher`` is E_t[g_td^2], one weight per dimension for every token;
    the loss's own second-order weight of token t's error in dimension d is g_td^2. Writing g_td^2 ~ a_t b_d (the
    independence approximation of that [tokens, dims] table: a_t its row sums, b_d its column sums) keeps the
    dimension weights b_d and adds a weight per token, a_t = ||g_t||^2, which the pipeline applies the way
    ``--token-weight residual`` applies its own (rows scaled by sqrt(a_t), mean 1 over the rows statistics see).
    """
    acc = _TokenAccumulator()
    _gradient_pass(acc, adapter, ids, batch_size, progress, "loss sensitivity (tokens)", model=model, store=store)
    return acc.token_weights(adapter, ids.shape)


class OutputWeight:
    """The loss's weight of a linear's output dimensions as a transform of its weight's rows: with F [out] (the
    diagonal, ``fisher``) row d is scaled by sqrt(F_d); with G [out, out] (``kfac``) the rows are mixed by the
    symmetric G^(1/2), so that ||rows(W)[:, j]||^2 = W_j^T G W_j, the loss estimate of removing input column j.
    The square root and its inverse are formed once per block and role (eigenvalues floored at 1e-8 of the mean
    diagonal, so the inverse exists)."""

    def __init__(self, weight: torch.Tensor):
        self.full = weight.dim() == 2
        if self.full:
            lam, q = torch.linalg.eigh(weight.double())
            lam = lam.clamp_min(1e-8)
            self.root = ((q * lam.sqrt()) @ q.T).float()
            self._inverse = (q * lam.rsqrt()) @ q.T  # fp64: undoing the mix must not amplify fp32 rounding
        else:
            self.root = weight.sqrt()

    def rows(self, weight: torch.Tensor) -> torch.Tensor:
        """``weight`` [out, in] with its rows weighted: its output energies become the loss estimate."""
        root = self.root.to(weight.device, weight.dtype)
        return root @ weight if self.full else weight * root[:, None]

    def unrows(self, weighted: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`rows` (OBS compensates weighted rows; the model keeps unweighted ones)."""
        if self.full:
            return (self._inverse.to(weighted.device) @ weighted.double()).to(weighted.dtype)
        return weighted / self.root.to(weighted.device, weighted.dtype)[:, None]


def weighted_rows(weight: torch.Tensor, fisher: OutputWeight | None) -> torch.Tensor:
    """``weight`` [out, in] with its rows weighted by ``fisher`` (:meth:`OutputWeight.rows`); None: unchanged
    (``--error-weight uniform``)."""
    return weight if fisher is None else fisher.rows(weight)
