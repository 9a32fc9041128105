"""Human-readable views of a report: a text table for the terminal and a per-layer PNG."""

from __future__ import annotations

from pathlib import Path


def format_table(rows: list[list], headers: list[str]) -> str:
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}" if abs(v) < 1e5 else f"{v:.3e}"
    return str(v)


def summary(report: dict) -> str:
    p = report["params"]
    s = report["settings"]
    head = [
        f"model          {report.get('model_source') and report['model_source']['origin'] or s['model']}",
        f"parameters     {p['before']:,} -> {p['after']:,}  (removed {p['achieved_sparsity']:.2%}"
        + (f", requested {p['requested_sparsity']:.2%})" if p.get("sparsity_basis", "total") == "total" else ")"),
        *([f"blocks         {p['blocks_before']:,} -> {p['blocks_after']:,}  (removed "
           f"{p['achieved_block_sparsity']:.2%} of the decoder blocks, requested {p['requested_sparsity']:.2%})"]
          if p.get("sparsity_basis") == "blocks" else []),
        *([_preset_line(s)] if s.get("preset") else []),
        f"criteria       FFN {s['ffn_criterion']}, heads {s['head_criterion']} (split {s['head_split']}, "
        f"tau {s['tau']}), recovery {s['recovery']}",
        f"calibration    {report['calibration']['source']}: {s['nsamples']} x {s['seqlen']} tokens, seed {s['seed']}",
        *([f"held out       {s.get('heldout_calibration') or report['calibration']['source']}: "
           f"{s['heldout_nsamples']} x {s['seqlen']} tokens, never a statistic"] if s.get("heldout_nsamples") else []),
        *([_allocation_line(report["allocation"])] if report.get("allocation") else []),
        f"time           {report['timings']['total_s']:.1f} s",
    ]
    table = layer_table(report["layers"])
    if any(r.get("experts") for r in report["layers"]):
        table += "\n\n" + expert_table(report["layers"])
    extra = []
    if "eval" in report:
        for k, v in report["eval"].get("ppl", {}).items():
            extra.append(f"perplexity     {k}: {v:.2f}")
    return "\n".join(head + extra) + "\n\n" + table


def _preset_line(settings: dict) -> str:
    """Which preset the run started from and what it set differently (a renamed or removed preset: the name only;
    every setting in effect is in report.json either way)."""
    from daprune.errors import ConfigError
    from daprune.presets import overridden

    try:
        changed = overridden(settings["preset"], settings)
    except (ConfigError, KeyError):
        return f"preset         {settings['preset']}"
    over = ", ".join(f"{k} {v}" for k, v in changed.items())
    return f"preset         {settings['preset']}" + (f" (set over it: {over})" if over else "")


def _allocation_line(alloc: dict) -> str:
    """One line for ``--schedule sensitivity|owl``: what choosing the shares cost and how unevenly it spread the
    budget."""
    shares = alloc["fractions"]
    dense = [i for i, f in shares.items() if f == 0]
    search = alloc.get("search") or {}
    found = ""
    if "cost" in search:
        start = min(search["start_costs"].values())
        found = f"; search KL {start:.4g} -> {search['cost']:.4g} in {search['generations']} generations"
    how = f"reused from {alloc['reused_from']}" if alloc.get("reused_from") else f"{alloc['seconds']:.1f} s"
    return (f"allocation     {alloc['mode']} ({how}): block shares {min(shares.values()):.0%}.."
            f"{max(shares.values()):.0%} of their parameters" + (f"; left dense: {', '.join(dense)}" if dense else "")
            + found)


def layer_table(layers: list[dict]) -> str:
    """Per pruned block: kept structure and relative errors; the held-out columns (errors on calibration rows
    no statistic saw, ``--heldout-nsamples``) appear when the run measured them, next to the fit-row errors
    they are to be compared with."""
    held = any(r.get("error_heldout") is not None for r in layers)
    rows = []
    for r in layers:
        if not r["pruned"]:
            continue
        row = [r["index"], len(r["kept_heads"]), r["kept_channels"], r["error_input"], r["error_no_recovery"]]
        row += [r.get("error_no_recovery_heldout")] if held else []
        row += [r["error"]] + ([r.get("error_heldout")] if held else []) + [r["seconds"]]
        rows.append(row)
    headers = ["block", "heads", "channels", "err in", "err no-rec"] + (["no-rec held-out"] if held else [])
    headers += ["err out"] + (["out held-out"] if held else []) + ["s"]
    return format_table(rows, headers)


def expert_table(layers: list[dict]) -> str:
    """Per pruned mixture-of-experts block: channels each expert keeps, calibration tokens routed per expert,
    and the experts no token reached (with what ``--unrouted-experts`` did to them)."""
    rows = []
    for r in layers:
        info = r.get("experts")
        if not r["pruned"] or not info:
            continue
        tokens = sorted(info["tokens"])
        unrouted = ", ".join(str(e) for e in info["unrouted"]) or "-"
        if info["unrouted"]:
            unrouted += f" ({info['unrouted_policy']})"
        rows.append([r["index"], len(tokens), info["kept_channels"], info.get("shared_kept_channels", "-"),
                     tokens[0], tokens[len(tokens) // 2], tokens[-1], unrouted])
    return format_table(rows, ["block", "experts", "kept/expert", "shared kept", "tokens min", "median", "max",
                               "unrouted"])


def plot_layers(report: dict, path: Path) -> Path | None:
    """Per-block relative output error and kept heads/channels; skipped without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    layers = report["layers"]
    idx = [r["index"] for r in layers]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True)
    ax1.plot(idx, [r["error"] for r in layers], "o-", label="block output (final)")
    if any(r["error_no_recovery"] is not None for r in layers):
        ax1.plot(idx, [r["error_no_recovery"] for r in layers], "s--", label="same choice, no recovery")
    ax1.set_ylabel("relative error vs dense")
    ax1.legend()
    shapes = report["shapes"]["layers"]
    moe = any("moe_intermediate_size" in s for s in shapes)
    widths = [s.get("moe_intermediate_size", s.get("intermediate_size", 0)) for s in shapes]
    ax2.bar(idx, widths, color="tab:blue", label="FFN channels")
    ax2.set_ylabel("FFN channels kept" + (" (per expert)" if moe else ""))
    ax3 = ax2.twinx()
    ax3.plot(idx, [s["num_attention_heads"] for s in shapes], "r^-", label="query heads")
    ax3.set_ylabel("query heads kept")
    ax2.set_xlabel("block")
    fig.suptitle("daprune: per-block error and kept structure")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_allocation(allocation: dict, path: Path, title: str = "") -> Path | None:
    """``--schedule sensitivity``: every block's measured KL curve (left) and the share it was given (right);
    ``owl``: every block's outlier ratio (left) instead."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fractions = allocation["fractions"]
    blocks = sorted(fractions, key=int)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4.2))
    if allocation["mode"] == "owl":
        ratios = allocation["outlier_ratio"]
        ax1.bar([int(b) for b in blocks], [100 * ratios[b] for b in blocks], color="tab:orange")
        ax1.set_xlabel("block")
        ax1.set_ylabel(f"% weights scoring > {allocation['threshold']:g} x mean (Wanda)")
    else:
        _plot_curves(ax1, allocation, blocks, plt.get_cmap("viridis"))
    ax2.bar([int(b) for b in blocks], [fractions[b] for b in blocks], color="tab:blue")
    ax2.axhline(allocation["average_share"], color="gray", ls="--", label="uniform share")
    ax2.set_xlabel("block")
    ax2.set_ylabel("share of its parameters removed")
    ax2.legend()
    fig.suptitle(title or f"daprune --schedule {allocation['mode']}: "
                 + ("measured cost and allocation" if allocation["mode"] == "sensitivity" else
                    "outlier ratios and allocation"))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _plot_curves(ax, allocation: dict, blocks: list[str], cmap) -> None:
    """Each block's measured KL against the fraction of its parameters removed (``--schedule sensitivity``)."""
    curves = allocation["curves"]
    for n, b in enumerate(blocks):
        c = curves[b]
        size = c["params"][0] / (allocation["size_multiples"][0] * allocation["average_share"])  # block parameters
        ax.plot([p / size for p in c["params"]], c["kl"], "o-", ms=3, color=cmap(n / max(len(blocks) - 1, 1)),
                label=f"block {b}" if n in (0, len(blocks) - 1) else None)
    ax.set_yscale("log")
    ax.set_xlabel("fraction of the block's parameters removed (this block alone)")
    ax.set_ylabel("KL(dense || pruned), nats per token")
    ax.legend()
