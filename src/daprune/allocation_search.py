"""``--allocation-search G``: refine the sensitivity schedule's allocation by searching on the whole pruned model.

The sensitivity schedule prices each block pruned *alone* and takes the costs as additive. They are not: the
damage of two pruned blocks compounds (the second sees the first's drift), and a block's cost depends on what
the blocks before it already lost. EvoPress (Sieberling et al., 2024) showed that searching over per-block
levels with the *whole* compressed model as the judge finds allocations that additive rules miss. Here:

- Each candidate block has a few levels: dense, and the trial blocks the sensitivity pass already built at
  multiples of the average share (kept in memory instead of thrown away). A state picks one level per block.
- A state's cost is KL(dense || model with every block at its level), on a few calibration rows, at every
  ``KL_POSITIONS_STRIDE``-th position: the same measure as the sensitivity curves, on the composed model.
- (1 + lambda) evolution: each generation makes ``OFFSPRING`` children of the best state by moving budget between
  blocks (one block one level up, another one level down, the total kept within half a step of the budget), scores
  them all on a quarter of the rows, the best ``FINALISTS`` on all of them, and keeps a child only if it beats its
  parent there. The parent's hidden states are cached per block, so a child runs from its first changed
  block only. The search starts from the better of the additive allocation (rounded to the levels) and the
  uniform share, so it can only keep or lower the measured cost.

The pipeline then prunes block by block with the chosen shares, exactly as with the additive ones.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

OFFSPRING = 8  # children per generation
FINALISTS = 2  # children scored on every row
# the levels the search moves between, in multiples of the average share: an even grid, so that moving one step
# of budget from one block to another keeps the total (blocks of one model are usually the same size)
SEARCH_MULTIPLES = (0.5, 1.0, 1.5, 2.0, 2.5, 3.0)


@dataclass
class SearchResult:
    state: tuple[int, ...]
    cost: float
    history: list[tuple[int, float]]  # (generation, parent cost) after every generation that improved
    starts: dict[str, float]  # cost of each starting state, by name


def mean_kl(ref: torch.Tensor, lp: torch.Tensor) -> float:
    """Mean per-position KL(p_ref || p) from log-probabilities over the last dimension."""
    return float((ref.exp() * (ref - lp)).sum(-1).mean())


def _total(state: Sequence[int], params: Sequence[Sequence[int]]) -> int:
    return sum(p[level] for p, level in zip(params, state, strict=True))


def mutate(state: tuple[int, ...], params: Sequence[Sequence[int]], budget: float, tol: float, swaps: int,
           rng: random.Random, tries: int = 64) -> tuple[int, ...] | None:
    """``state`` with ``swaps`` moves of budget: one block one level up, another one level down, the total parameters
    removed staying within ``tol`` of ``budget`` after each move. ``params[b][l]`` is block b's count at level l
    (level 0: dense, 0). None when no move is possible."""
    s = list(state)
    done = 0
    raised: set[int] = set()
    lowered: set[int] = set()
    for _ in range(tries):
        if done == swaps:
            break
        up, down = rng.sample(range(len(s)), 2)
        if s[up] + 1 >= len(params[up]) or s[down] == 0 or up in lowered or down in raised:
            continue  # (a block never moves both ways in one mutation, so moves cannot undo each other)
        total = _total(s, params) + params[up][s[up] + 1] - params[up][s[up]] + params[down][s[down] - 1] \
            - params[down][s[down]]
        if abs(total - budget) > tol:
            continue
        s[up] += 1
        s[down] -= 1
        raised.add(up)
        lowered.add(down)
        done += 1
    return tuple(s) if done else None


def nearest_state(targets: Sequence[float], params: Sequence[Sequence[int]], budget: float, tol: float
                  ) -> tuple[int, ...] | None:
    """The levels closest to per-block parameter ``targets``, moved one level at a time (the block furthest from its
    target first) until the total is within ``tol`` of ``budget``; None if that cannot be reached."""
    s = [min(range(len(p)), key=lambda level, p=p, t=t: abs(p[level] - t)) for p, t in zip(params, targets,
                                                                                          strict=True)]
    for _ in range(sum(len(p) for p in params)):
        total = _total(s, params)
        if abs(total - budget) <= tol:
            return tuple(s)
        if total < budget:
            can = [b for b in range(len(s)) if s[b] + 1 < len(params[b])]
            if not can:
                return None
            b = max(can, key=lambda b: targets[b] - params[b][s[b]])
            s[b] += 1
        else:
            can = [b for b in range(len(s)) if s[b] > 0]
            if not can:
                return None
            b = max(can, key=lambda b: params[b][s[b]] - targets[b])
            s[b] -= 1
    return None


def evolve(starts: dict[str, tuple[int, ...]], params: Sequence[Sequence[int]], budget: float, tol: float,
           cost: Callable[[tuple[int, ...], int], float], rows: int, generations: int, rng: random.Random,
           adopt: Callable[[tuple[int, ...]], None] = lambda state: None, progress: Callable[[int, float], None]
           = lambda generation, best: None) -> SearchResult:
    """(1 + lambda) search for the state of least ``cost(state, rows)`` (``cost(state, r)``: the cost on the first
    r rows). ``adopt(state)`` is told each new parent (the caller caches its hidden states)."""
    scored = {name: cost(state, rows) for name, state in starts.items()}
    name = min(scored, key=scored.get)
    parent, best = starts[name], scored[name]
    adopt(parent)
    few = max(1, rows // 4)
    history: list[tuple[int, float]] = [(0, best)]
    for g in range(1, generations + 1):
        children = {mutate(parent, params, budget, tol, rng.choice((1, 2, 3)), rng) for _ in range(OFFSPRING)}
        children.discard(None)
        if children:
            ranked = sorted(children, key=lambda c: cost(c, few)) if few < rows else list(children)
            finals = [(cost(c, rows), c) for c in ranked[:FINALISTS]]
            c_cost, child = min(finals)
            if c_cost < best:
                parent, best = child, c_cost
                adopt(parent)
                history.append((g, best))
        progress(g, best)
    return SearchResult(parent, best, history, scored)


class ComposedKL:
    """KL(dense || the model with each candidate block at its level) on fixed rows, as the sensitivity curves
    measure it; hidden states of the adopted parent are cached per layer so a state runs from its first change.
    ``dense(j)`` returns layer j's dense block (a streaming view loads it on access)."""

    def __init__(self, dense: Callable[[int], object], n_layers: int, contexts: list[dict], levels: dict[int, list],
                 x: torch.Tensor, log_probs: Callable[[torch.Tensor], torch.Tensor], bs: int):
        self.dense, self.n_layers, self.contexts, self.levels, self.bs = dense, n_layers, contexts, levels, bs
        self.order = sorted(levels)  # candidate block indices, in the order of a state's entries
        self.log_probs = log_probs
        self.x = x
        self.inputs: list[torch.Tensor] = []  # the adopted parent's input to every layer
        self.parent: tuple[int, ...] | None = None
        self.ref = log_probs(self._run((0,) * len(self.order), 0, x, keep=False))
        self.evaluations = 0

    def _block(self, state: tuple[int, ...], j: int):
        if j in self.levels:
            level = state[self.order.index(j)]
            if level:
                return self.levels[j][level]
        return self.dense(j)

    def _run(self, state: tuple[int, ...], start: int, h: torch.Tensor, keep: bool) -> torch.Tensor:
        from daprune.block_ops import forward_rows

        for j in range(start, self.n_layers):
            if keep:
                self.inputs.append(h)
            h = forward_rows(self._block(state, j), h, self.contexts[j], self.bs)
        return h

    def adopt(self, state: tuple[int, ...]) -> None:
        self.inputs = []
        self.parent = state
        self._run(state, 0, self.x, keep=True)

    def __call__(self, state: tuple[int, ...], rows: int) -> float:
        self.evaluations += 1
        start, h = 0, self.x[:rows]
        if self.parent is not None:
            changed = [self.order[k] for k, (a, b) in enumerate(zip(state, self.parent, strict=True)) if a != b]
            if changed:
                start = min(changed)
                h = self.inputs[start][:rows]
        lp = self.log_probs(self._run(state, start, h, keep=False))
        return mean_kl(self.ref[:rows], lp)


def search_targets(dense: Callable[[int], object], n_layers: int, contexts: list[dict],
                   trials: dict[int, list[tuple[int, object]]], hull_targets: dict[int, float], share: float,
                   sizes: dict[int, int], x: torch.Tensor,
                   log_probs: Callable[[torch.Tensor], torch.Tensor], bs: int, generations: int, seed: int,
                   progress: bool = False) -> tuple[dict[int, float], dict]:
    """Per-block targets from the search, scaled to the additive targets' total, and the report entry.

    ``trials[b]`` holds (params removed, trial block) for block b at each of its measured sizes, ascending.
    """
    t0 = time.perf_counter()
    budget = sum(hull_targets.values())
    order = sorted(trials)
    params = [[0] + [p for p, _ in trials[b]] for b in order]
    levels = {b: [None] + [t for _, t in trials[b]] for b in order}
    units = [share * sizes[b] * (SEARCH_MULTIPLES[1] - SEARCH_MULTIPLES[0]) for b in order]
    tol = max(units) / 2
    starts = {}
    additive = nearest_state([hull_targets[b] for b in order], params, budget, tol)
    if additive is not None:
        starts["additive"] = additive
    uniform = nearest_state([share * sizes[b] for b in order], params, budget, tol)
    if uniform is not None and uniform != additive:
        starts["uniform"] = uniform
    if not starts:
        return dict(hull_targets), {"skipped": "no state of the measured levels is within half a step of the budget"}
    kl = ComposedKL(dense, n_layers, contexts, levels, x, log_probs, bs)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=generations, desc="allocation search", leave=False)

    def tick(_g: int, best: float) -> None:
        if bar is not None:
            bar.update(1)
            bar.set_postfix(kl=f"{best:.4g}")

    try:
        result = evolve(starts, params, budget, tol, kl, x.shape[0], generations, random.Random(seed),
                        adopt=kl.adopt, progress=tick)
    finally:
        if bar is not None:
            bar.close()
    chosen = {b: params[k][result.state[k]] for k, b in enumerate(order)}
    scale = budget / sum(chosen.values())
    targets = {b: chosen[b] * scale for b in order}
    entry = {"generations": generations, "offspring": OFFSPRING, "finalists": FINALISTS, "nsamples": x.shape[0],
             "multiples": list(SEARCH_MULTIPLES), "start_costs": result.starts, "cost": result.cost,
             "history": result.history, "levels": {str(b): result.state[k] for k, b in enumerate(order)},
             "evaluations": kl.evaluations, "seconds": time.perf_counter() - t0}
    return targets, entry
