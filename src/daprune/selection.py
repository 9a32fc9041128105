"""Greedy output approximation: choose which FFN channels to remove by the exact output error.

Per-channel scores (criteria/) ignore that channels are correlated: two channels that cancel
each other can both look important. With the second moment S = E[h h^T] of the down_proj input h
and the down weight D, removing a set R changes the FFN output by D_R h_R, whose energy is

    E(R) = sum_{i,j in R} (D_i . D_j) S_ij.

* ``greedy`` grows R one channel at a time, each time adding the channel that increases E least.
* ``obs`` also re-fits the kept columns by least squares after each removal (Optimal Brain
  Surgeon on the structured unit): the error increase of removing j is ||W_:,j||^2 / [S^-1]_jj and
  the kept columns absorb the removed one's contribution.
Both return the removal order, so any prefix is the greedy choice for that many channels.
"""

from __future__ import annotations

import torch


def greedy_order(d: torch.Tensor, second: torch.Tensor, count: int) -> list[int]:
    """Removal order of ``count`` channels minimising the uncompensated output error.

    The Gram D^T D is one fp32 matmul (in fp64 it was a sixth of a default prune's time): each entry is a dot
    product of one column pair, good to about 1e-7 relative, while the greedy sums over chosen rows, where
    cancellation can happen, run in fp64. A is symmetric, so row j (contiguous) stands for column j.
    """
    gram = d.float().T @ d.float()
    a = gram.double() * second.double()  # A_ij = (D_i . D_j) S_ij
    diag = torch.diagonal(a).clone()
    acc = torch.zeros_like(diag)  # sum over chosen i of A_ij
    chosen = torch.zeros(a.shape[0], dtype=torch.bool, device=a.device)
    inf = torch.tensor(float("inf"), dtype=a.dtype, device=a.device)
    order = torch.empty(count, dtype=torch.long, device=a.device)
    # tensors, not Python ints, inside the loop: on a GPU each int() would wait for the device (a sync per step)
    for t in range(count):
        j = torch.argmin(torch.where(chosen, inf, diag + 2 * acc)).view(1)
        order[t] = j[0]
        chosen[j] = True
        acc += a.index_select(0, j)[0]
    return order.tolist()


def obs_order(d: torch.Tensor, second: torch.Tensor, count: int, damp: float = 1e-2,
              steps: int = 32) -> tuple[list[int], torch.Tensor]:
    """Removal order with least-squares compensation; returns it and the compensated weight [out, in].

    Channels leave in about ``steps`` chunks followed by one joint Schur-complement update each (BLAS
    matmuls; removing one channel per full update costs ~45 s per SmolLM2 block on a busy 2-core CPU,
    chunks ~1 s). A chunk is chosen one channel at a time (:func:`_pick_chunk`), re-costing after each
    pick, so of two duplicate channels (each free while the other stays) only one goes. The returned
    weight has the removed columns at zero and the kept ones compensated.
    """
    w = d.double().clone()
    s = second.double()
    lam = damp * torch.diagonal(s).mean().clamp_min(1e-12)
    hinv = torch.linalg.inv(s + lam * torch.eye(s.shape[0], dtype=s.dtype, device=s.device))
    dead = torch.zeros(s.shape[0], dtype=torch.bool, device=s.device)
    chunk = max(1, -(-count // steps))
    order: list[int] = []
    while len(order) < count:
        b = _pick_chunk(w, hinv, dead, min(chunk, count - len(order)))
        order += b.tolist()
        inv_bb = torch.linalg.inv(hinv[b][:, b])
        rows = hinv[b]  # [k, I]
        w -= (w[:, b] @ inv_bb) @ rows
        hinv -= rows.T @ inv_bb @ rows
        dead[b] = True
        w[:, b] = 0.0
        hinv[b, b] = 1.0  # keep removed indices inert (their rows and columns are now zero)
    return order, w.float()


def obs_ranking(d: torch.Tensor, second: torch.Tensor, count: int, damp: float = 1e-2
                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Every channel index, the ``count`` OBS removes first (in removal order) then the rest in index order,
    and the compensated weight (:func:`obs_order`)."""
    first, w = obs_order(d, second, count, damp)
    taken = set(first)
    return torch.tensor(first + [c for c in range(d.shape[1]) if c not in taken], dtype=torch.long), w


def _obs_cost(w: torch.Tensor, hinv: torch.Tensor) -> torch.Tensor:
    """OBS cost of removing each column alone: ||W_:,j||^2 / [S^-1]_jj."""
    return w.pow(2).sum(0) / torch.diagonal(hinv).clamp_min(1e-30)


def _pick_chunk(w: torch.Tensor, hinv: torch.Tensor, dead: torch.Tensor, k: int) -> torch.Tensor:
    """Up to ``k`` channels, picked one at a time by exact sequential OBS within a small candidate pool.

    Ranking all channels by their individual cost once would take two duplicate channels together: each is
    free while its twin stays, but not both. So the pool (the ``2k + 8`` individually cheapest) is updated
    after every pick with the same rank-1 OBS step the full matrices get, restricted to the pool
    (O(pool^2) per pick). The chunk ends early when the next pick would cost more than the cheapest
    channel outside the pool, whose cost the pool cannot track.
    """
    cost = _obs_cost(w, hinv)
    cost[dead] = float("inf")
    alive = int((~dead).sum())
    p = min(alive, 2 * k + 8)
    ranked = torch.topk(cost, min(alive, p + 1), largest=False).indices
    pool, outside = ranked[:p], (float(cost[ranked[p]]) if len(ranked) > p else float("inf"))
    hp = hinv[pool][:, pool].clone()
    wp = w[:, pool].clone()
    free = torch.ones(p, dtype=torch.bool, device=w.device)
    picked: list[int] = []
    while len(picked) < k:
        c = _obs_cost(wp, hp)
        c[~free] = float("inf")
        j = int(torch.argmin(c))
        if picked and float(c[j]) > outside:
            break
        picked.append(j)
        free[j] = False
        col = hp[:, j].clone()
        wp -= torch.outer(wp[:, j], col) / hp[j, j]
        hp -= torch.outer(col, col) / hp[j, j]
    return pool[torch.tensor(picked, dtype=torch.long, device=pool.device)]
