"""The head-similarity figure: heads of one block as nodes, an edge where JS divergence < tau.

This is the talk's picture of LLaMA-7B blocks 4 and 5: connected heads attend alike and are the
redundancy Algorithm 2 removes first. Divergences come either from a pruned run's ``report.json``
(``layers[i].head_divergence``, with the pruned heads marked) or are computed on the dense model from
calibration text, with the same JS accumulator the pipeline uses. A heatmap of the divergence matrix
under each graph shows how close the pairs come to tau.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from daprune.errors import ConfigError


@dataclass
class HeadGraph:
    """Divergences of one block plus what is known about its heads (KV groups, pruned, redundant)."""

    block: int
    divergence: torch.Tensor  # [heads, heads], nats
    groups: list[list[int]] | None = None
    pruned: list[int] = field(default_factory=list)
    redundant: list[int] = field(default_factory=list)


def parse_blocks(spec: str) -> list[int]:
    try:
        blocks = [int(b) for b in str(spec).split(",") if b.strip()]
    except ValueError:
        raise ConfigError(f"--similarity-figure takes block indices like 4 or 4,5; got {spec!r}") from None
    if not blocks:
        raise ConfigError("--similarity-figure needs at least one block index")
    return blocks


def graphs_from_report(path: str | Path, blocks: list[int]) -> list[HeadGraph]:
    """Read ``layers[i].head_divergence`` (and kept/redundant heads) from a pruned run's report."""
    path = Path(path)
    if path.is_dir():
        path = path / "report.json"
    if not path.is_file():
        raise ConfigError(f"report not found: {path}")
    layers = {r["index"]: r for r in json.loads(path.read_text())["layers"]}
    out = []
    for b in blocks:
        row = layers.get(b)
        if row is None or row.get("head_divergence") is None:
            raise ConfigError(f"{path} has no head divergences for block {b} (only pruned blocks with "
                              "--head-criterion similarity and grouped heads record them)")
        div = torch.tensor(row["head_divergence"])
        pruned = [h for h in range(div.shape[0]) if h not in row.get("kept_heads", range(div.shape[0]))]
        out.append(HeadGraph(b, div, None, pruned, list(row.get("redundant_heads", []))))
    return out


@torch.no_grad()
def graphs_from_model(model, tokenizer, blocks: list[int], *, calibration: str = "lambada", nsamples: int = 16,
                      seqlen: int = 128, seed: int = 0, batch_size: int = 8, data_dir: str | None = None,
                      progress: bool = False) -> list[HeadGraph]:
    """Mean-over-query-rows JS divergence of every head pair, on the dense model's own stream."""
    from daprune.criteria.similarity import JSAccumulator
    from daprune.data.calibration import calibration_tokens
    from daprune.models.adapter import get_adapter
    from daprune.stores import ResidentStore

    adapter = get_adapter(model)
    bad = [b for b in blocks if not 0 <= b < adapter.n_layers]
    if bad:
        raise ConfigError(f"block(s) {bad} out of range: the model has {adapter.n_layers} blocks")
    ids, _ = calibration_tokens(calibration, model, tokenizer, nsamples, seqlen, seed, data_dir=data_dir,
                                progress=progress)
    store = ResidentStore(adapter)
    x = store.embed(ids, batch_size)
    contexts = store.layer_inputs(ids.shape[1])
    out = []
    for i in range(max(blocks) + 1):
        block, ctx = adapter.block(i), contexts[i]
        ys = []
        acc = JSAccumulator(block.n_heads) if i in blocks else None
        for s in range(0, x.shape[0], batch_size):
            probs: list[torch.Tensor] | None = [] if acc is not None else None
            ys.append(block.forward(x[s : s + batch_size], ctx, probs))
            if acc is not None:
                acc.update(probs[0])
        if acc is not None:
            out.append(HeadGraph(i, acc.divergence, block.head_groups()))
        x = torch.cat(ys)
    return sorted(out, key=lambda g: blocks.index(g.block))


def _circle(n: int) -> dict[int, tuple[float, float]]:
    import math

    return {i: (math.cos(2 * math.pi * i / n + math.pi / 2), math.sin(2 * math.pi * i / n + math.pi / 2))
            for i in range(n)}


def draw(graphs: list[HeadGraph], tau: float, out: str | Path, title: str | None = None) -> Path:
    """One column per block: the tau-graph on top (networkx circle layout if installed), the heatmap below."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    try:
        import networkx as nx
    except ImportError:  # pragma: no cover - networkx is optional
        nx = None
    cols = len(graphs)
    fig, axes = plt.subplots(2, cols, figsize=(4.2 * cols, 8), squeeze=False,
                             gridspec_kw={"height_ratios": [1.15, 1]})
    cmap = plt.get_cmap("tab10")
    for c, g in enumerate(graphs):
        ax, hax = axes[0][c], axes[1][c]
        d = g.divergence.float()
        n = d.shape[0]
        edges = [(i, j, float(d[i, j])) for i in range(n) for j in range(i + 1, n) if float(d[i, j]) < tau]
        pos = nx.circular_layout(range(n)) if nx is not None else _circle(n)
        if nx is not None:
            pos = {i: tuple(map(float, p)) for i, p in pos.items()}
        group_of = {h: k for k, grp in enumerate(g.groups or []) for h in grp}
        for i, j, dij in edges:
            w = 0.5 + 3.5 * (1 - dij / tau) if tau > 0 else 1.0
            ax.plot([pos[i][0], pos[j][0]], [pos[i][1], pos[j][1]], "-", color="0.35", lw=w, zorder=1)
        for h in range(n):
            face = cmap(group_of[h] % 10) if h in group_of else "tab:blue"
            edge = "red" if h in g.pruned else "black"
            ax.scatter(*pos[h], s=420, color=face, edgecolors=edge, linewidths=3 if h in g.pruned else 1, zorder=2)
            ax.text(*pos[h], str(h), ha="center", va="center", fontsize=9, color="white", zorder=3)
        off = d[~torch.eye(n, dtype=torch.bool)]
        ax.set_title(f"block {g.block}: {len(edges)} pairs with JS < {tau:g}\n(min {float(off.min()):.3f}, "
                     f"median {float(off.median()):.3f} nats)", fontsize=10)
        ax.set_xlim(-1.3, 1.3)
        ax.set_ylim(-1.3, 1.3)
        ax.set_aspect("equal")
        ax.axis("off")
        im = hax.imshow(d.numpy(), cmap="viridis_r", vmin=0)
        hax.set_title("JS divergence (nats)", fontsize=9)
        hax.set_xlabel("head")
        hax.set_ylabel("head")
        fig.colorbar(im, ax=hax, fraction=0.046, pad=0.04)
    legend = "node colour: KV group" if any(g.groups for g in graphs) else ""
    if any(g.pruned for g in graphs):
        legend += ("; " if legend else "") + "red ring: pruned head"
    fig.suptitle((title or "Attention-head similarity") + (f"\n{legend}" if legend else ""), fontsize=11)
    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def cmd_similarity_figure(args) -> int:
    """``daprune compare --similarity-figure BLOCKS --out fig.png [--report report.json]``."""
    if not args.out:
        raise ConfigError("--similarity-figure needs --out FILE.png")
    blocks = parse_blocks(args.similarity_figure)
    if args.report:
        graphs = graphs_from_report(args.report, blocks)
        title = f"Head similarity from {args.report}"
    else:
        from daprune.models.loading import load_model

        model, tok, src = load_model(args.model, cache=args.cache_dir)
        graphs = graphs_from_model(model, tok, blocks, calibration=args.calibration, nsamples=args.nsamples,
                                   seqlen=args.seqlen, seed=args.seed, batch_size=args.batch_size,
                                   data_dir=args.data_dir, progress=not args.quiet)
        title = f"Head similarity, {src.origin} (dense, {args.calibration} {args.nsamples} x {args.seqlen})"
    path = draw(graphs, args.tau, args.out, title)
    for g in graphs:
        n = g.divergence.shape[0]
        pairs = sum(1 for i in range(n) for j in range(i + 1, n) if float(g.divergence[i, j]) < args.tau)
        print(f"block {g.block}: {n} heads, {pairs} pairs with JS < {args.tau:g}")
    print(f"wrote {path}")
    return 0
