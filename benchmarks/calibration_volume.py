"""Quality against calibration volume (tokens = --nsamples x --seqlen), from a settings_bench calibration JSON.

Reads the rows of ``docs/calibration_<model>.json`` that differ from a plain prune only in calibration text, sample
count and sequence length (ours; Wanda-sp with ``--method wanda-sp``), prints one table per method, and plots
perplexity against tokens (one panel per corpus, log-log) to ``docs/figures/calibration_volume_<model>.png``.
Nothing is run here: the rows come from ``python benchmarks/settings_bench.py <model> --suite calibration``.

    python benchmarks/calibration_volume.py smollm2 --text lambada+coqa
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from settings_bench import LABELS, heldout_mean

from daprune.config import PruneConfig

# the arguments a row may carry and still count as "only the calibration changed"
VOLUME_FLAGS = {"--calibration", "--nsamples", "--seqlen"}
FIXED_FLAGS = {"--out", "--sparsity", "--eval", "--max-windows", "--channel-multiple", "--model", "--sparsity-basis"}
PEER_FLAGS = {"wanda-sp": {"--ffn-criterion", "--head-criterion", "--selection"}}


def row_volume(command: str, method: str) -> tuple[str, int, int] | None:
    """(calibration text, nsamples, seqlen) of a row that changes only those (and the method's own flags)."""
    args = shlex.split(command)[2:]
    flags = {a: args[i + 1] for i, a in enumerate(args) if a.startswith("--") and i + 1 < len(args)
             and not args[i + 1].startswith("--")}
    switches = {a for a in args if a.startswith("--") and a not in flags}
    allowed = VOLUME_FLAGS | FIXED_FLAGS | PEER_FLAGS.get(method, set())
    if switches - {"--quiet"} or set(flags) - allowed:
        return None
    if method == "ours" and any(f in flags for f in PEER_FLAGS["wanda-sp"]):
        return None
    if method == "wanda-sp" and flags.get("--ffn-criterion") != "wanda-sp":
        return None
    d = PruneConfig()
    return (flags.get("--calibration", d.calibration), int(flags.get("--nsamples", d.nsamples)),
            int(flags.get("--seqlen", d.seqlen)))


def points(data: dict, text: str, method: str) -> list[dict]:
    corpora = data["corpora"].split(",")
    out = []
    for name, row in data["rows"].items():
        if name == "dense" or not (vol := row_volume(row["command"], method)) or vol[0] != text:
            continue
        out.append({"row": name, "nsamples": vol[1], "seqlen": vol[2], "tokens": vol[1] * vol[2],
                    "ppl": row["ppl"], "heldout_mean": heldout_mean(row["ppl"], corpora), "prune_s": row["prune_s"]})
    return sorted(out, key=lambda p: (p["tokens"], p["seqlen"]))


def table(pts: list[dict], corpora: list[str]) -> str:
    head = "| samples x seqlen | tokens | " + " | ".join(LABELS.get(c, c) for c in corpora) + \
        " | held-out geo. mean | prune s |"
    lines = [head, "|---|---|" + "---|" * len(corpora) + "---|---|"]
    for p in pts:
        cells = " | ".join(f"{p['ppl'][c]:.2f}" for c in corpora)
        lines.append(f"| {p['nsamples']} x {p['seqlen']} | {p['tokens']:,} | {cells} | {p['heldout_mean']:.2f} | "
                     f"{p['prune_s']:.0f} |")
    return "\n".join(lines)


def plot(series: dict[str, list[dict]], dense: dict, corpora: list[str], path: Path, title: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, axes = plt.subplots(1, len(corpora), figsize=(4 * len(corpora), 4))
    for ax, corpus in zip(axes, corpora, strict=True):
        for method, pts in series.items():
            if pts:
                ax.plot([p["tokens"] for p in pts], [p["ppl"][corpus] for p in pts], "o-", label=method)
        if corpus in dense:
            ax.axhline(dense[corpus], color="grey", ls="--", label="dense")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(LABELS.get(corpus, corpus))
        ax.set_xlabel("calibration tokens")
    axes[0].set_ylabel("perplexity")
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("which", help="the settings_bench model name (smollm2, gemma3)")
    ap.add_argument("--text", default="lambada+coqa", help="calibration text whose volume varies")
    ap.add_argument("--json", default=None, help="default docs/calibration_<which>.json")
    ap.add_argument("--plot", default=None, help="default docs/figures/calibration_volume_<which>.png")
    args = ap.parse_args()
    path = Path(args.json or f"docs/calibration_{args.which}.json")
    if not path.is_file():
        raise SystemExit(f"{path} not found: run benchmarks/settings_bench.py {args.which} --suite calibration first")
    data = json.loads(path.read_text())
    corpora = data["corpora"].split(",")
    series = {m: points(data, args.text, m) for m in ("ours", "wanda-sp")}
    for method, pts in series.items():
        print(f"\n{method}, --calibration {args.text}:\n{table(pts, corpora)}")
    out = Path(args.plot or f"docs/figures/calibration_volume_{args.which}.png")
    dense = data["rows"].get("dense", {}).get("ppl", {})
    title = f"{data['model']}, {data['sparsity']:.0%} removed, --calibration {args.text}"
    if plot(series, dense, corpora, out, title):
        print(f"\nplot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
