"""Every row of ``daprune compare`` at 10, 20, 30 and 50% sparsity, on SmolLM2-135M and Gemma-3-270M (docs/sweep.md).

One ``daprune compare`` per (model, sparsity); each row runs in its own child process and the JSON is rewritten
after every row, so a stopped sweep continues where it stopped (``--resume``: rows whose full settings are
unchanged are kept; a changed default re-runs only the rows it affects). Percentages are of the decoder blocks'
parameters (``--sparsity-basis blocks``) on both models, ``--channel-multiple 1`` so every row removes the same
count, perplexity on 64 evenly spaced 128-token windows per corpus (the 20% tables in docs/compare.md and
docs/gemma3.md use 256 and add zero-shot). Pruning time and peak memory come from each row's own process.

    export DAPRUNE_DATA_DIR=/work/shared/data OMP_NUM_THREADS=1
    python benchmarks/sparsity_sweep.py run smollm2                       # runs/sweep/smollm2/s10.json ...
    python benchmarks/sparsity_sweep.py run gemma3 --model gemma3-270m.gguf
    python benchmarks/sparsity_sweep.py merge                             # docs/sweep.json, docs/sweep.md, plots

``run`` takes ``--sparsities 0.3,0.5`` and ``--rows ours-c,wanda-sp`` to do part of it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

SPARSITIES = (0.1, 0.2, 0.3, 0.5)
WINDOWS = 64
RUNS = Path("runs/sweep")
DOC, JSON_OUT, FIGURES = Path("docs/sweep.md"), Path("docs/sweep.json"), Path("docs/figures")
TABLE = "<!-- sweep tables: written by benchmarks/sparsity_sweep.py merge -->", "<!-- /sweep tables -->"
SUMMARY = "<!-- sweep summary: written by benchmarks/sparsity_sweep.py merge -->", "<!-- /sweep summary -->"
README = Path("README.md")
SUMMARY_ROWS = ("ours-c", "ours-c-hrec", "ours-c-hrec-block", "ours-sg", "ours-sg-hrec", "ours-sg-hrec-block")
MODELS = ("smollm2", "gemma3")
CORPORA = {"wikitext2": "WikiText-2", "ptb": "PTB"}


def run_path(model: str, sparsity: float) -> Path:
    return RUNS / model / f"s{round(100 * sparsity):02d}.json"


def compare_argv(model_path: str | None, sparsity: float, out: Path, rows: str | None) -> list[str]:
    """The ``daprune compare`` command line of one (model, sparsity) cell of the sweep."""
    argv = ["compare", "--sparsity", str(sparsity), "--sparsity-basis", "blocks", "--channel-multiple", "1",
            "--max-windows", str(WINDOWS), "--json", str(out), "--resume", "--quiet"]
    if model_path:
        argv += ["--model", model_path]
    if rows:
        argv += ["--rows", rows]
    return argv


def cmd_run(args) -> int:
    from daprune.cli import main

    if args.which == "gemma3" and not args.model:
        raise SystemExit("gemma3 needs --model PATH (the assembled GGUF, see docs/gemma3.md)")
    sparsities = [float(s) for s in args.sparsities.split(",")] if args.sparsities else list(SPARSITIES)
    for s in sparsities:
        out = run_path(args.which, s)
        out.parent.mkdir(parents=True, exist_ok=True)
        print(f"== {args.which} at {s:.0%} -> {out}", flush=True)
        rc = main(compare_argv(args.model, s, out, args.rows))
        if rc:
            return rc
    return 0


def load_sweep(model: str) -> dict[float, dict]:
    """Every finished (sparsity -> compare JSON) of one model."""
    out = {}
    for s in SPARSITIES:
        path = run_path(model, s)
        if path.is_file():
            out[s] = json.loads(path.read_text())
    return out


def sweep_table(runs: dict[float, dict], previous: list[dict] | None = None) -> list[dict]:
    """One record per row key: label, group, and per sparsity its perplexities, params, time and memory.

    ``previous`` is a model's rows from the last merged sweep.json: its cells stay unless a finished run
    replaces them, because the per-cell JSONs live in an ignored folder and a fresh checkout must still add
    new cells to what was published rather than drop it."""
    by_key: dict[str, dict] = {r["key"]: {**r, "at": dict(r["at"])} for r in previous or []}
    for s, run in sorted(runs.items()):
        for r in run["rows"]:
            rec = by_key.setdefault(r["key"], {"key": r["key"], "label": r["label"], "group": r["group"],
                                               "at": {}})
            rec["at"][f"{s:g}"] = {"ppl": r.get("ppl", {}), "params": r["params"], "sparsity": r["sparsity"],
                                   "prune_s": r["prune_s"], "peak_rss_prune_mb": r["peak_rss_prune_mb"],
                                   "threads": run.get("threads")}
    from daprune.evaluation.compare import table_order

    for rec in by_key.values():
        rec["at"] = dict(sorted(rec["at"].items(), key=lambda kv: float(kv[0])))
    return table_order(list(by_key.values()))  # cells merged one at a time must not leave rows in run order


def _ppl(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 1000 else f"{value:.2f}"


def format_model(rows: list[dict], corpus: str) -> str:
    """Rows x sparsities of one corpus's perplexity; the best pruned row of each column in bold."""
    cols = [f"{s:g}" for s in SPARSITIES]
    best = {c: min((r["at"][c]["ppl"].get(corpus, float("inf")) for r in rows
                    if r["key"] != "dense" and c in r["at"]), default=None) for c in cols}
    lines = ["| Method | " + " | ".join(f"{float(c):.0%}" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        cells = []
        for c in cols:
            at = r["at"].get(c) or (next(iter(r["at"].values())) if r["key"] == "dense" else None)
            v = None if at is None else at["ppl"].get(corpus)
            text = _ppl(v)
            cells.append(f"**{text}**" if v is not None and r["key"] != "dense" and v == best[c] else text)
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_summary(rows: list[dict]) -> str:
    """The README's view: dense, our main rows and the best peer of each cell, WikiText-2 / PTB per size, and
    the best of our rows against the best peer (a negative margin: ours is lower)."""
    from daprune.evaluation.compare import ROWS

    cols = [f"{s:g}" for s in SPARSITIES]
    peers = [r for r in rows if r["key"] != "dense" and not r["key"].startswith("ours")]
    ours = [r for r in rows if r["key"].startswith("ours")]
    every_peer = {r.key for r in ROWS if r.default and r.key != "dense" and not r.key.startswith("ours")}

    def best(group: list[dict], c: str, corpus: str) -> tuple[float, str] | None:
        found = [(r["at"][c]["ppl"][corpus], r["label"]) for r in group if corpus in r["at"].get(c, {}).get("ppl", {})]
        return min(found) if found else None

    def pair(r: dict, c: str) -> str:
        at = r["at"].get(c) or (next(iter(r["at"].values())) if r["key"] == "dense" else None)
        return "-" if at is None else " / ".join(_ppl(at["ppl"].get(k)) for k in CORPORA)

    lines = ["| WikiText-2 / PTB | " + " | ".join(f"{float(c):.0%}" for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    lines += [f"| {r['label']} | " + " | ".join(pair(r, c) for c in cols) + " |"
              for r in rows if r["key"] == "dense" or r["key"] in SUMMARY_ROWS]
    peer_cells, margin_cells = [], []
    for c in cols:
        bp = [best(peers, c, k) for k in CORPORA]
        bo = [best(ours, c, k) for k in CORPORA]
        if None in bp:
            peer_cells.append("-")
            margin_cells.append("-")
            continue
        names = bp[0][1] if bp[0][1] == bp[1][1] else f"{bp[0][1]}; {bp[1][1]}"
        ran = every_peer & {r["key"] for r in peers if c in r["at"]}
        if ran != every_peer:  # a partial column: the best so far, saying of how many
            names += f"; best of {len(ran)} of {len(every_peer)} peers"
        peer_cells.append(" / ".join(_ppl(v) for v, _ in bp) + f" ({names})")
        margin_cells.append("-" if None in bo else " / ".join(f"{o[0] / p[0] - 1:+.1%}" for o, p in zip(bo, bp,
                                                                                                     strict=True)))
    lines.append("| Best peer | " + " | ".join(peer_cells) + " |")
    lines.append("| Best of ours vs best peer | " + " | ".join(margin_cells) + " |")
    return "\n".join(lines)


def format_cost(rows: list[dict], threads: int | None = None) -> str:
    """Pruning wall time (s) and peak RSS (MB) of every row at every sparsity, each column headed by the torch
    thread count its rows ran at (cells may run in different sessions; ``threads``: for cells that predate the
    per-cell record)."""
    cols = [f"{s:g}" for s in SPARSITIES]

    def head(c: str) -> str:
        ran = sorted({str(r["at"][c].get("threads") or threads) for r in rows if r["key"] != "dense" and c in r["at"]})
        return f"{float(c):.0%} s / MB" + (f" ({', '.join(ran)} thr)" if ran else "")

    lines = ["| Method | " + " | ".join(head(c) for c in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for r in rows:
        if r["key"] == "dense":
            continue
        cells = [f"{r['at'][c]['prune_s']:.0f} / {r['at'][c]['peak_rss_prune_mb']:.0f}" if c in r["at"] else "-"
                 for c in cols]
        lines.append(f"| {r['label']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_model(rows: list[dict], model: str, path: Path) -> Path | None:
    """Perplexity against sparsity, one line per row, one panel per corpus (log scale); needs matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, axes = plt.subplots(1, len(CORPORA), figsize=(12, 4.5))
    colors = plt.get_cmap("tab20")
    for ax, (corpus, name) in zip(axes, CORPORA.items(), strict=True):
        for n, r in enumerate(rows):
            pts = sorted((float(c), at["ppl"][corpus]) for c, at in r["at"].items() if corpus in at["ppl"])
            if r["key"] == "dense" and pts:
                ax.axhline(pts[0][1], color="black", lw=1, ls=":", label="Dense")
                continue
            if pts:
                style = "-" if r["key"].startswith("ours") else "--"
                ax.plot([100 * p for p, _ in pts], [v for _, v in pts], style, marker="o", ms=3, label=r["label"],
                        color=colors(n % 20))
        ax.set_yscale("log")
        ax.set_xlim(0, 55)
        ax.set_xlabel("% of block parameters removed")
        ax.set_title(f"{model}: {name} perplexity ({WINDOWS} windows)")
        ax.grid(alpha=0.3)
    axes[-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def cmd_merge(_args) -> int:
    from daprune.atomic import atomic_write_bytes
    from daprune.evaluation.compare import replace_between

    out: dict = {"protocol": {"sparsities": list(SPARSITIES), "sparsity_basis": "blocks", "channel_multiple": 1,
                              "max_windows": WINDOWS, "runs": str(RUNS)}, "models": {}}
    previous = json.loads(JSON_OUT.read_text())["models"] if JSON_OUT.is_file() else {}
    sections, summaries = [], []
    for model in MODELS:
        runs, before = load_sweep(model), previous.get(model, {})
        if not runs and not before:
            continue
        rows = sweep_table(runs, before.get("rows"))
        first = next(iter(runs.values())) if runs else before
        # model-level threads: of the earliest cells, which record none of their own (cells record theirs)
        threads = before.get("threads") or first.get("threads")
        out["models"][model] = {"model": first.get("model"), "threads": threads,
                                "rows": rows,
                                "commands": {**before.get("commands", {}),
                                             **{f"{s:g}": run.get("command") for s, run in runs.items()}}}
        figure = plot_model(rows, model, FIGURES / f"sweep_{model}.png")
        parts = [f"### {model}"]
        parts += [f"{name} perplexity:\n\n{format_model(rows, corpus)}" for corpus, name in CORPORA.items()]
        parts.append(f"Pruning wall time / peak RSS of the row's process (torch threads per column):\n\n"
                     f"{format_cost(rows, threads)}")
        if figure:
            parts.append(f"![{model} sweep](figures/{figure.name})")
        sections.append("\n\n".join(parts))
        summaries.append(f"{model_name(model)} ({WINDOWS} windows):\n\n{format_summary(rows)}")
    atomic_write_bytes(JSON_OUT, (json.dumps(out, indent=1) + "\n").encode())
    body = "\n\n".join(sections)
    print(body)
    for doc, markers, text in ((DOC, TABLE, body), (README, SUMMARY, "\n\n".join(summaries))):
        if doc.is_file():
            before_text = doc.read_text()
            after_text = replace_between(before_text, markers, text)
            if after_text != before_text:
                atomic_write_bytes(doc, after_text.encode())
    return 0


def model_name(model: str) -> str:
    return {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "Gemma-3-270M"}[model]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="run (or continue) one model's sweep")
    r.add_argument("which", choices=MODELS)
    r.add_argument("--model", default=None, help="model path (default: the embedded SmolLM2-135M)")
    r.add_argument("--sparsities", default=None, help=f"comma-separated (default {SPARSITIES})")
    r.add_argument("--rows", default=None, help="compare rows (default: every default row)")
    sub.add_parser("merge", help="tables, JSON and plots from every finished run")
    args = p.parse_args(argv)
    return cmd_run(args) if args.cmd == "run" else cmd_merge(args)


if __name__ == "__main__":
    sys.exit(main())
