"""Which tokens the FFN statistics listen to: the case for ``--token-weight residual``.

For each block of the dense model, over calibration rows: the residual stream's norm per token (the first position,
an attention sink in most models, separately), the share of the down_proj input energy (what second-moment scores,
greedy selection and OBS sum) that the top 1% of tokens hold, and how much the weighting w_t = 1 / mean(h_t^2) (mean
1) changes the total: "kept" = sum_t w_t e_t / sum_t e_t, 1 where the weighting is neutral, small where high-norm
tokens carry the energy. Prints a table, writes JSON.

    python benchmarks/token_energy.py --json docs/token_energy_smollm2.json
    python benchmarks/token_energy.py --model gemma3-270m.gguf --json docs/token_energy_gemma3.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from daprune.atomic import atomic_write_json
from daprune.data.calibration import calibration_tokens
from daprune.models.adapter import get_adapter
from daprune.models.loading import load_model
from daprune.report import format_table


@torch.no_grad()
def measure(model, ids: torch.Tensor) -> list[dict]:
    adapter = get_adapter(model)
    seen: dict[int, dict[str, torch.Tensor]] = {}
    handles = []
    for i in range(adapter.n_layers):
        block = adapter.block(i)

        def pre(_m, args, kwargs, _i=i):
            h = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(_i, {})["h"] = h.detach().float()

        def down(_m, args, _i=i):
            seen.setdefault(_i, {})["x"] = args[0].detach().float()

        handles.append(block.layer.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.ffn_out().register_forward_pre_hook(down))
    try:
        model(ids)
    finally:
        for h in handles:
            h.remove()
    rows = []
    for i in range(adapter.n_layers):
        h, x = seen[i]["h"], seen[i]["x"]
        norm = h.norm(dim=-1)  # [rows, seq]
        rest = norm[:, 1:].flatten()
        median = rest.median()
        e = x[:, 1:].pow(2).sum(-1).flatten()  # FFN input energy per token (the first position apart)
        top = e.sort(descending=True).values[: max(1, e.numel() // 100)]
        w = 1.0 / h[:, 1:].pow(2).mean(-1).flatten()
        w = w / w.mean()
        rows.append({
            "block": i,
            "first_position_norm_over_median": float(norm[:, 0].mean() / median),
            "norm_p99_over_median": float(torch.quantile(rest, 0.99) / median),
            "first_position_energy_share": float(x[:, 0].pow(2).sum() / x.pow(2).sum()),
            "top1pct_energy_share": float(top.sum() / e.sum()),
            "energy_kept_by_weighting": float((w * e).sum() / e.sum()),
        })
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None)
    ap.add_argument("--calibration", default="lambada")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=128)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    model, tok, _ = load_model(args.model)
    ids, info = calibration_tokens(args.calibration, model, tok, args.nsamples, args.seqlen, 0, args.data_dir)
    rows = measure(model.eval(), ids)
    print(format_table(
        [[r["block"], f"{r['first_position_norm_over_median']:.1f}", f"{r['norm_p99_over_median']:.2f}",
          f"{r['first_position_energy_share']:.3f}", f"{r['top1pct_energy_share']:.3f}",
          f"{r['energy_kept_by_weighting']:.3f}"] for r in rows],
        ["block", "first pos. norm / median", "p99 norm / median", "first pos. energy", "top 1% energy",
         "kept by weighting"]))
    if args.json:
        atomic_write_json(Path(args.json), {"model": args.model or "default (SmolLM2-135M-Instruct)",
                                            "calibration": info, "command": " ".join(["python", *sys.argv]),
                                            "rows": rows})


if __name__ == "__main__":
    main()
