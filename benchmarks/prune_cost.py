"""Pruning cost: wall time of a prune divided by one dense forward pass over the same calibration tokens.

The floor of a one-shot sequential pipeline is about 2x (two activation streams, pruned and dense, each one
forward of every block); everything above that is the method's own work. Each row prunes the default model
in this process (resident, fp32, the machine's threads), after timing the dense forward on the very token ids
the row calibrates on (best of 3), and says where the time went:

* ``blocks``: per-block pruning work (statistics passes, head similarity, scores, selection, re-fits, slicing),
  the sum of report.json ``layers[].seconds``;
* ``allocation``: ``--schedule sensitivity``'s measuring pass (report.json ``allocation.seconds``);
* ``streams``: the rest of the pipeline: the two streams' block forwards, embedding, bookkeeping;
* ``calibration``: reading or generating the calibration text (self-generated text costs generation).

    python benchmarks/prune_cost.py --json docs/prune_cost.json            # every row
    python benchmarks/prune_cost.py --rows default self-generated          # some rows
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from daprune.api import prune
from daprune.atomic import atomic_write_json
from daprune.config import PruneConfig
from daprune.data.calibration import calibration_tokens
from daprune.models.loading import load_model
from daprune.report import format_table

ROWS = {
    "default": {},
    "self-generated": {"calibration": "self"},
    "sensitivity": {"schedule": "sensitivity"},
    "heldout-recovery": {"recovery": "heldout", "heldout_nsamples": 16},
    "block-remedy": {"recovery": "heldout", "heldout_nsamples": 16, "recovery_target": "block",
                     "recovery_inputs": True},
    "nsamples-128": {"nsamples": 128},
}


@torch.no_grad()
def dense_forward_seconds(model, ids: torch.Tensor, batch_size: int, repeats: int = 3) -> float:
    """Best wall time of one forward of the whole model over ``ids`` in ``batch_size`` batches."""
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        for s in range(0, ids.shape[0], batch_size):
            model(input_ids=ids[s : s + batch_size], use_cache=False)
        best = min(best, time.perf_counter() - t)
    return best


def run_row(name: str, settings: dict, model_source: str | None, channel_multiple: int) -> dict:
    cfg = PruneConfig(model=model_source, channel_multiple=channel_multiple, **settings)
    cfg.validate()
    model, tok, _ = load_model(cfg.model)
    model.eval()
    # the scoring (and re-fit) tokens this row calibrates on, generated exactly as the prune will generate them
    n = max(cfg.nsamples, cfg.recovery_nsamples or 0)
    ids, _ = calibration_tokens(cfg.calibration, model, tok, n, cfg.seqlen, cfg.seed, self_gen=cfg.self_gen,
                                progress=False)
    forward = dense_forward_seconds(model, ids, cfg.batch_size)
    t = time.perf_counter()
    result = prune(cfg, model=model, tokenizer=tok, progress=False)
    wall = time.perf_counter() - t
    rep = result.report
    timings = rep["timings"]
    blocks = sum(r["seconds"] for r in rep["layers"])
    allocation = (rep.get("allocation") or {}).get("seconds", 0.0)
    streams = timings["pipeline_s"] - blocks - allocation
    return {"row": name, "settings": settings, "calibration_tokens": int(ids.numel()), "dense_forward_s": forward,
            "prune_s": wall, "ratio": wall / forward, "pipeline_ratio": timings["pipeline_s"] / forward,
            "calibration_s": timings.get("calibration_s", 0.0), "blocks_s": blocks, "allocation_s": allocation,
            "streams_s": streams, "threads": torch.get_num_threads()}


def table(rows: list[dict]) -> str:
    head = ["row", "tokens", "dense fwd s", "prune s", "prune / fwd", "pipeline / fwd", "calibration s", "blocks s",
            "allocation s", "streams s"]
    body = [[r["row"], r["calibration_tokens"], f"{r['dense_forward_s']:.2f}", f"{r['prune_s']:.1f}",
             f"{r['ratio']:.1f}x", f"{r['pipeline_ratio']:.1f}x", f"{r['calibration_s']:.1f}", f"{r['blocks_s']:.1f}",
             f"{r['allocation_s']:.1f}", f"{r['streams_s']:.1f}"] for r in rows]
    return format_table(body, head)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    ap.add_argument("--model", default=None, help="model (default: the embedded SmolLM2-135M-Instruct)")
    ap.add_argument("--channel-multiple", type=int, default=PruneConfig().channel_multiple)
    ap.add_argument("--json", default=None, help="write the rows here (rewritten after each row; resumable)")
    args = ap.parse_args()
    done = {}
    if args.json and Path(args.json).is_file():
        done = {r["row"]: r for r in json.loads(Path(args.json).read_text())["rows"]}
    rows = []
    for name in args.rows:
        row = done.get(name) or run_row(name, ROWS[name], args.model, args.channel_multiple)
        rows.append(row)
        if args.json:
            atomic_write_json(Path(args.json), {"model": args.model or "default", "rows": rows})
        print(f"{name}: {row['ratio']:.1f}x", flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
