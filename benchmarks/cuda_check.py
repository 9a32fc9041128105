"""The CUDA path against the CPU, and what pruning costs on a GPU (run it on a machine with one).

Why: ``--device cuda`` moves each block, its statistics and both activation streams to the GPU; CI has no GPU,
so this script is how the project checks that the GPU path prunes what the CPU path prunes and how fast it is.

1. **Agreement.** A small random-weight Llama checkpoint (``memory_bench.write_synthetic``) is pruned at 20% with
   random calibration ids on ``--device cpu`` and ``--device cuda``, streaming and in memory, under the default
   selection (greedy), OBS (128 samples), ``--error-weight fisher`` and LLM-Pruner's ``taylor-e1``. Per setting: do
   both outputs have the same tensors and shapes, and how far apart are their weights (max |a - b| / max |a|).
   Greedy choices can differ where two candidates tie to float rounding, so a differing tensor is reported, not
   asserted away.
2. **Cost.** A random-weight checkpoint of TinyLlama-1.1B's shape (``--big``; 22 blocks, hidden 2048, FFN 5632,
   32 heads / 4 KV heads) pruned on the GPU, streaming, fp32: prune wall time, one dense forward of the same model
   over the same calibration tokens (batches of 8, best of 3, on the GPU), their ratio and the peak GPU memory.

    python benchmarks/cuda_check.py --json docs/cuda_check.json           # both parts (a GPU machine)
    python benchmarks/cuda_check.py --device cpu --skip-big               # the script itself, on a CPU
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory_bench import write_synthetic  # noqa: E402

SMALL = dict(hidden=512, inter=1536, heads=8, kv=2, vocab=2000)
BIG = dict(hidden=2048, inter=5632, heads=32, kv=4, vocab=32000)
SETTINGS = {  # name -> PruneConfig fields besides model / sparsity / device
    "default (greedy)": {},
    "OBS, 128 samples": {"nsamples": 128},
    "--error-weight fisher": {"error_weight": "fisher"},
    "taylor-e1": {"ffn_criterion": "taylor-e1", "head_criterion": "taylor-e1", "selection": "score"},
}
BASE = dict(sparsity=0.2, calibration="random", channel_multiple=1, seed=0)


def prune_folder(model: Path, out: Path, device: str, streaming: bool, **settings) -> dict:
    """One ``daprune.prune`` into ``out``; returns its report with the peak GPU memory added."""
    import daprune

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    result = daprune.prune(model=str(model), out=str(out), overwrite=True, streaming=streaming, progress=False,
                           device=device, **BASE, **settings)
    report = result.report
    report["gpu_peak_bytes"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None
    return report


def weights(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def agreement(a: Path, b: Path) -> dict:
    """Same tensors and shapes? Largest weight difference relative to the tensor's largest entry, and how many
    tensors differ by more than 1e-3 of it."""
    wa, wb = weights(a), weights(b)
    same_shapes = wa.keys() == wb.keys() and all(wa[k].shape == wb[k].shape for k in wa)
    rel = {k: float((wa[k].float() - wb[k].float()).abs().max() / wa[k].float().abs().max().clamp_min(1e-30))
           for k in wa if k in wb and wa[k].shape == wb[k].shape}
    return {"same_tensors_and_shapes": same_shapes, "max_rel_diff": max(rel.values(), default=None),
            "tensors_over_1e-3": sum(v > 1e-3 for v in rel.values()), "tensors": len(wa)}


def dense_forward_s(model: Path, ids: torch.Tensor, device: str, batch_size: int = 8) -> float:
    """Best of 3 of one dense forward over ``ids`` in batches, on ``device`` (fp32)."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).to(device).eval()
    best = float("inf")
    with torch.no_grad():
        for _ in range(3):
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            t = time.perf_counter()
            for s in range(0, ids.shape[0], batch_size):
                m(input_ids=ids[s : s + batch_size].to(device), use_cache=False)
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            best = min(best, time.perf_counter() - t)
    del m
    return best


def check_agreement(root: Path, device: str) -> list[dict]:
    model = root / "small"
    write_synthetic(model, 8, **SMALL)  # the default layers 4:-2 prune blocks 4 and 5
    rows = []
    for name, settings in SETTINGS.items():
        for streaming in (True, False):
            outs = {}
            times = {}
            try:
                for dev in ("cpu", device):
                    out = root / f"out-{len(rows)}-{dev}"
                    t = time.perf_counter()
                    prune_folder(model, out, dev, streaming, **settings)
                    times[dev] = time.perf_counter() - t
                    outs[dev] = out
            except Exception as e:  # noqa: BLE001 - a failing setting is a finding; the others still run
                row = {"setting": name, "streaming": streaming, "error": f"{type(e).__name__}: {e}",
                       "where": traceback.format_exc().strip().splitlines()[-3].strip()}
            else:
                row = {"setting": name, "streaming": streaming, **agreement(outs["cpu"], outs[device]),
                       "cpu_s": times["cpu"], "device_s": times[device]}
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def check_cost(root: Path, device: str, layers: int) -> list[dict]:
    model = root / "big"
    write_synthetic(model, layers, **BIG)
    rows = []
    for nsamples in (16, 128):
        report = prune_folder(model, root / f"big-out-{nsamples}", device, True, nsamples=nsamples)
        ids = torch.randint(0, BIG["vocab"], (nsamples, 128), generator=torch.Generator().manual_seed(0))
        fwd = dense_forward_s(model, ids, device)
        t = report["timings"]
        row = {"nsamples": nsamples, "params_before": report["params"]["before"],
               "params_after": report["params"]["after"], "prune_s": t["total_s"], "pipeline_s": t.get("pipeline_s"),
               "dense_forward_s": fwd, "ratio": t["total_s"] / fwd,
               "gpu_peak_gib": (report["gpu_peak_bytes"] or 0) / 2**30, "timings": t}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def render(result: dict) -> str:
    lines = [f"device: {result['device_name']}, torch {result['torch']}", "",
             "| setting | streaming | same shapes | max rel. diff | tensors > 1e-3 | cpu s | device s |",
             "|---|---|---|---|---|---|---|"]
    for r in result["agreement"]:
        if "error" in r:
            lines.append(f"| {r['setting']} | {r['streaming']} | error: {r['error']} ({r['where']}) | | | | |")
            continue
        lines.append(f"| {r['setting']} | {r['streaming']} | {r['same_tensors_and_shapes']} | "
                     f"{r['max_rel_diff']:.2e} | {r['tensors_over_1e-3']} / {r['tensors']} | {r['cpu_s']:.1f} | "
                     f"{r['device_s']:.1f} |")
    if result["cost"]:
        lines += ["", "| samples x 128 | params | prune s | dense forward s | prune / forward | GPU peak GiB |",
                  "|---|---|---|---|---|---|"]
        for r in result["cost"]:
            lines.append(f"| {r['nsamples']} | {r['params_before'] / 1e9:.2f}B -> {r['params_after'] / 1e9:.2f}B | "
                         f"{r['prune_s']:.1f} | {r['dense_forward_s']:.3f} | {r['ratio']:.1f}x | "
                         f"{r['gpu_peak_gib']:.1f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda", help="the device checked against the CPU (default cuda)")
    p.add_argument("--skip-big", action="store_true", help="only the agreement part")
    p.add_argument("--big-layers", type=int, default=22, help="blocks of the cost model (TinyLlama: 22)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; --device cpu checks the script itself")
    result = {"device_name": torch.cuda.get_device_name(0) if args.device.startswith("cuda") else platform.processor(),
              "torch": torch.__version__, "command": " ".join(sys.argv), "agreement": [], "cost": []}
    with tempfile.TemporaryDirectory() as tmp:
        result["agreement"] = check_agreement(Path(tmp), args.device)
        if not args.skip_big:
            result["cost"] = check_cost(Path(tmp), args.device, args.big_layers)
    table = render(result)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
