"""Would dropping a block's whole attention be a cheaper way to free its parameters than the pipeline's plans?

The candidate splits of a GQA block always keep at least one query head per KV group and every K/V head
(:func:`daprune.schedule.head_options`), so a block never loses its attention outright. Some papers drop whole
attention sublayers of large models at little cost (He et al. 2024, "What matters in transformers? Not all
attention is needed"). On SmolLM2-135M a block's attention holds 884,736 parameters, about the average share a
block loses at 20% of all parameters, so the question is cheap to settle before building anything: for every block,
the mean per-token KL of the dense model with only that block's attention output zeroed (no compensation), against
the KL the sensitivity pass of a finished ``--schedule sensitivity`` prune measured for that block at the same number
of parameters (linear between its measured sizes, OBS-compensated plans). Same measure as the pass: KL(dense || trial)
at every 4th position of ``--nsamples`` calibration rows.

    python benchmarks/attention_drop.py --report runs/s28/quality-seeds/seed-4 --json docs/attention_drop_smollm2.json
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

from daprune.allocation import KL_POSITIONS_STRIDE
from daprune.allocation_reuse import report_path
from daprune.allocation_search import mean_kl
from daprune.atomic import atomic_write_json
from daprune.data.calibration import calibration_tokens
from daprune.models.adapter import get_adapter
from daprune.models.loading import load_model


def _zero_attention(_module, _args, out):
    """Forward hook: the attention module's output replaced by zeros (its other outputs kept)."""
    return (torch.zeros_like(out[0]), *out[1:])


@torch.no_grad()
def attention_drop_kls(model, ids: torch.Tensor) -> list[float]:
    """Mean per-token KL(dense || model with block i's attention output zeroed), for every block i."""
    adapter = get_adapter(model)

    def log_probs() -> torch.Tensor:
        return torch.log_softmax(model(ids).logits[:, ::KL_POSITIONS_STRIDE].float(), -1)

    dense = log_probs()
    kls = []
    for i in range(adapter.n_layers):
        hook = adapter.block(i).attention_module().register_forward_hook(_zero_attention)
        try:
            kls.append(mean_kl(dense, log_probs()))
        finally:
            hook.remove()
    return kls


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--report", required=True, help="a finished --schedule sensitivity prune of the same model")
    ap.add_argument("--model", default=None, help="model source (default: the embedded default model)")
    ap.add_argument("--calibration", default="coqa+wiki", help="text of the KL rows (default: coqa+wiki)")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    curves = json.loads(report_path(args.report).read_text())["allocation"]["curves"]
    model, tok, _ = load_model(args.model)
    adapter = get_adapter(model)
    ids, info = calibration_tokens(args.calibration, model, tok, args.nsamples, args.seqlen, args.seed, progress=False)

    t0 = time.perf_counter()
    kls = attention_drop_kls(model, ids)
    rows = []
    print("| block | attention params | KL, attention dropped | KL of the pipeline's plan at that size | ratio |")
    print("|---|---|---|---|---|")
    for i, dropped in enumerate(kls):
        params = sum(p.numel() for p in adapter.block(i).attention_module().parameters())
        c = curves.get(str(i))
        plan = float(np.interp(params, c["params"], c["kl"])) if c else None
        ratio = dropped / plan if plan else None
        rows.append({"block": i, "attention_params": params, "kl_attention_dropped": dropped,
                     "kl_plan_same_size": plan, "ratio": ratio})
        print(f"| {i} | {params:,} | {dropped:.4f} | {'-' if plan is None else f'{plan:.4f}'} | "
              f"{'-' if ratio is None else f'{ratio:.2f}'} |", flush=True)
    lowest = min((r for r in rows if r["ratio"] is not None), key=lambda r: r["ratio"], default=None)
    if lowest is not None:
        print(f"\nlowest ratio: block {lowest['block']}, {lowest['ratio']:.2f} (below 1 would make dropping cheaper)")
    if args.json:
        atomic_write_json(args.json, {
            "command": "python benchmarks/attention_drop.py " + " ".join(
                f"--{k.replace('_', '-')} {v}" for k, v in vars(args).items() if v is not None and k != "json"),
            "report": str(report_path(args.report)), "calibration": info, "positions_stride": KL_POSITIONS_STRIDE,
            "seconds": time.perf_counter() - t0, "rows": rows})


if __name__ == "__main__":
    main()
