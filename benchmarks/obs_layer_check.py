"""Is OBS's FFN channel choice still improvable at the layer level? Swap search and damping, on real statistics.

For a few blocks of the default model this collects the down_proj inputs on calibration rows (dense inputs), picks
the channels to remove with :func:`daprune.selection.obs_order` (the pipeline's OBS), and reports the compensated
output error E = tr((D - W) S (D - W)^T) on the fit rows' second moment S and on held-out rows no solve saw:

* at several ``--obs-damp`` values (how much the ridge of the compensation matters);
* after a swap local search in the style of OSSCAR (Meng et al. 2024) on the objective OBS minimises (the error on
  the damped Gram S + lambda I, i.e. a ridge toward the original columns): give back one of the 8 removed channels
  whose return lowers it most, drop the kept channel whose OBS cost is least, and keep the swap only when the
  objective after the exact re-fit is lower; up to ``--max-swaps``. ``refit_equals_obs`` checks that the re-fit
  reproduces obs_order's compensated weight (largest difference relative to the largest weight).

A large drop from the swaps would mean OBS's greedy order leaves error on the table; a large effect of the damping
on held-out rows would mean its default is off. Session 26 found neither (docs/quality.md).

    python benchmarks/obs_layer_check.py --json docs/obs_layer_check.json
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from daprune.atomic import atomic_write_json
from daprune.data.calibration import calibration_tokens
from daprune.models.loading import load_model
from daprune.selection import obs_order

# block index: FFN channels removed there by seed 2 of `--preset quality` (report.json layers[].plan.channels)
BLOCKS = {7: 519, 10: 773, 15: 1038, 25: 391}
DAMPS = (1e-1, 3e-2, 1e-2, 3e-3, 1e-3, 1e-4)


def output_error(d: torch.Tensor, w: torch.Tensor, second: torch.Tensor) -> float:
    """E||(D - W) h||^2 for inputs with second moment ``second``."""
    e = d - w
    return float(torch.einsum("oi,ij,oj->", e, second, e))


def refit(d: torch.Tensor, second: torch.Tensor, keep: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Least-squares weight on the kept columns, zeros elsewhere, and the kept Gram's inverse (a damped ``second``
    makes it OBS's ridge toward the original columns)."""
    inv = torch.linalg.inv(second[keep][:, keep])
    w = torch.zeros_like(d)
    w[:, keep] = d @ second[:, keep] @ inv
    return w, inv


def swap_search(d: torch.Tensor, second: torch.Tensor, keep: list[int], max_swaps: int,
                tries: int = 8) -> tuple[list[int], int]:
    """Add-one / drop-one swaps that lower the fit error; the kept set and how many swaps were taken."""
    n, swaps = d.shape[1], 0
    ds = d @ second
    while swaps < max_swaps:
        w, inv = refit(d, second, keep)
        out = sorted(set(range(n)) - set(keep))
        cross = second[keep][:, out]
        resid = ds[:, out] - w[:, keep] @ cross
        schur = torch.diagonal(second)[out] - torch.einsum("ki,kl,li->i", cross, inv, cross)
        gain = resid.pow(2).sum(0) / schur  # error drop from giving channel j back, kept columns re-fitted
        current = output_error(d, w, second)
        for j in (out[i] for i in torch.topk(gain, min(tries, len(out))).indices.tolist()):
            grown = sorted(keep + [j])
            w2, inv2 = refit(d, second, grown)
            cost = w2[:, grown].pow(2).sum(0) / torch.diagonal(inv2)  # OBS cost of dropping each one again
            cost[grown.index(j)] = float("inf")
            drop = grown[int(torch.argmin(cost))]
            trial = [c for c in grown if c != drop]
            if output_error(d, refit(d, second, trial)[0], second) < current * (1 - 1e-9):
                keep, swaps = trial, swaps + 1
                break
        else:
            break
    return keep, swaps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calibration", default="coqa+wiki", help="calibration text (no generation: fast)")
    ap.add_argument("--nsamples", type=int, default=256, help="fit rows of 128 tokens")
    ap.add_argument("--heldout", type=int, default=64, help="held-out rows of 128 tokens")
    ap.add_argument("--max-swaps", type=int, default=300)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_grad_enabled(False)
    model, tok, src = load_model(None)
    total = args.nsamples + args.heldout
    ids, _ = calibration_tokens(args.calibration, model, tok, total, 128, 0, os.environ.get("DAPRUNE_DATA_DIR"),
                                progress=False)
    acts: dict[int, list[torch.Tensor]] = {b: [] for b in BLOCKS}

    def hook(b: int):
        return lambda _m, a: acts[b].append(a[0].reshape(-1, a[0].shape[-1]).double())

    handles = [model.model.layers[b].mlp.down_proj.register_forward_pre_hook(hook(b)) for b in BLOCKS]
    for i in range(0, total, 16):
        model(ids[i:i + 16])
    for h in handles:
        h.remove()
    rows = {}
    print(f"{'block':>5} {'removed':>7} | {'damp':>6} {'fit':>9} {'held-out':>9} | swaps, fit / held-out change")
    for b, count in BLOCKS.items():
        x = torch.cat(acts[b])
        fit_n = args.nsamples * 128
        s, sh = x[:fit_n].T @ x[:fit_n] / fit_n, x[fit_n:].T @ x[fit_n:] / (len(x) - fit_n)
        d = model.model.layers[b].mlp.down_proj.weight.double()
        damps = {}
        for damp in DAMPS:
            _, w = obs_order(d, s, count, damp)
            damps[str(damp)] = {"fit": output_error(d, w.double(), s), "heldout": output_error(d, w.double(), sh)}
        # OBS minimises the error on the damped Gram S + lam I (a ridge toward D, not toward zero): the swaps search
        # that same objective, and re-fit exactly as obs_order compensates
        damped = s + 1e-2 * torch.diagonal(s).mean() * torch.eye(s.shape[0], dtype=s.dtype)
        order, w_obs = obs_order(d, s, count, 1e-2)
        keep = sorted(set(range(d.shape[1])) - set(order))
        w0 = refit(d, damped, keep)[0]
        t0 = time.perf_counter()
        keep2, swaps = swap_search(d, damped, keep, args.max_swaps)
        w1 = refit(d, damped, keep2)[0]
        row = {"removed": count, "damp": damps, "swaps": swaps, "swap_s": time.perf_counter() - t0,
               "refit_equals_obs": float((w0 - w_obs.double()).abs().max() / w_obs.abs().max()),
               "obs": {"fit": output_error(d, w0, s), "heldout": output_error(d, w0, sh)},
               "after_swaps": {"fit": output_error(d, w1, s), "heldout": output_error(d, w1, sh)}}
        rows[str(b)] = row
        for damp, e in damps.items():
            print(f"{b:>5} {count:>7} | {damp:>6} {e['fit']:>9.2f} {e['heldout']:>9.2f} |")
        ch = [100 * (row["after_swaps"][k] / row["obs"][k] - 1) for k in ("fit", "heldout")]
        print(f"{b:>5} {count:>7} | swaps {swaps}: fit {ch[0]:+.3f}%, held-out {ch[1]:+.3f}% "
              f"({row['swap_s']:.0f} s)")
    if args.json:
        atomic_write_json(args.json, {"model": src.origin, "calibration": args.calibration, "nsamples": args.nsamples,
                                      "heldout": args.heldout, "seqlen": 128, "seed": 0, "inputs": "dense model",
                                      "error": "tr((D - W) S (D - W)^T)", "blocks": rows})


if __name__ == "__main__":
    main()
