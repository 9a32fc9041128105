"""Does pruning make the model faster? Prune SmolLM2-135M, save it, and time it against the dense original.

Usage::

    nice -n 10 python benchmarks/speed_bench.py [--model SRC] [--sparsity 0.2] [--channel-multiples 1,64]
                                                [--dtypes float32,bfloat16] [--repeats 5] [--threads 1]
                                                [--device cpu|cuda|auto]

For every channel multiple it runs ``daprune.api.prune`` (default settings otherwise), saves the
result with ``daprune.output.save_pruned``, reloads the folder the way ``daprune bench`` does and times
dense vs pruned in each dtype (alternating repeats, medians; see ``daprune.evaluation.bench``).
Writes ``docs/speed.json`` and ``docs/speed.md`` and prints the tables.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from daprune.errors import DapruneError
from daprune.evaluation.bench import BenchSettings, _sync, bench_models, format_bench, load_for_bench, resolve_device

ROOT = Path(__file__).resolve().parents[1]
GOAL = 1.2  # decode speedup the issue asks for


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="model source (default: embedded SmolLM2-135M-Instruct)")
    p.add_argument("--sparsity", type=float, default=0.2)
    p.add_argument("--channel-multiples", default="1,64", help="one pruned model per value (comma separated)")
    p.add_argument("--dtypes", default="float32,bfloat16")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=1,
                   help="CPU threads; 1 because the 2-core machine is shared and OpenMP threads stall when "
                        "another process holds a core")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"),
                   help="where both models are timed (auto: cuda when available); --threads still sets CPU threads")
    p.add_argument("--work-dir", default=str(ROOT / "runs" / "speed"), help="where the pruned folders go")
    p.add_argument("--json", default=str(ROOT / "docs" / "speed.json"))
    p.add_argument("--md", default=str(ROOT / "docs" / "speed.md"))
    p.add_argument("--render-only", action="store_true", help="rewrite --md from an existing --json, no runs")
    p.add_argument("--probe-only", action="store_true",
                   help="add the overhead probe to an existing --json (no pruning, no dense/pruned runs), re-render")
    return p.parse_args(argv)


def prune_variant(args: argparse.Namespace, multiple: int) -> tuple[Path, dict]:
    """Prune with default settings and this channel multiple; save it like ``daprune prune`` does."""
    from daprune.api import prune
    from daprune.config import PruneConfig

    out = Path(args.work_dir) / f"smollm2-{round(args.sparsity * 100)}pct-cm{multiple}"
    t0 = time.perf_counter()
    cfg = PruneConfig(model=args.model, sparsity=args.sparsity, channel_multiple=multiple)
    res = prune(cfg, out=str(out), overwrite=True, progress=False)
    shapes = res.report["shapes"]
    info = {"out": str(out), "prune_s": time.perf_counter() - t0, "uniform": shapes["uniform"],
            "achieved_sparsity": res.report["params"]["achieved_sparsity"],
            "heads_removed_blocks": sum(1 for r in res.report["layers"] if r["pruned"] and r["kept_heads"]
                                        and len(r["kept_heads"]) < res.model.config.num_attention_heads),
            "channels": sorted({s["intermediate_size"] for s in shapes["layers"]})}
    del res
    return out, info


def bench_variant(folder: Path, baseline: str, dtype: str, s: BenchSettings, device: str = "cpu") -> dict:
    dense = load_for_bench(baseline, dtype, device)
    pruned = load_for_bench(str(folder), dtype, device)
    return bench_models(dense, pruned, s)


def decode_breakdown(result: dict) -> dict[str, float]:
    """Decode step times, split with the overhead probe into a fixed part and a width-dependent part.

    ``scaling`` is how much the width-dependent part shrank (pruned/dense; the bytes ratio if it
    scaled with the weights), ``predicted`` the decode speedup if it had shrunk exactly with the bytes.
    """
    d, p = result["dense"], result["pruned"]
    steps = result["settings"]["new_tokens"] - 1
    td, tp = d["median_s"]["decode"] / steps * 1e3, p["median_s"]["decode"] / steps * 1e3
    out = {"step_ms_dense": td, "step_ms_pruned": tp}
    probe = result.get("overhead_probe")
    if probe:
        a, bytes_ratio = probe["step_ms"], p["weight_bytes"] / d["weight_bytes"]
        out.update(fixed_ms=a, scaling=(tp - a) / (td - a), predicted=td / (a + (td - a) * bytes_ratio))
    paired = [x / y for x, y in zip(d["times_s"]["decode"], p["times_s"]["decode"], strict=True)]
    out.update(paired_min=min(paired), paired_max=max(paired))
    return out


def overhead_probe(baseline: str, dtype: str, s: BenchSettings, device: str = "cpu") -> dict[str, float]:
    """Decode step time of a model with the dense model's layout but ~no weights (width 64, vocab 256).

    Same 30 blocks, same modules and kernels per step, ~0 FLOPs and bytes: what remains is the per-step
    cost that pruning cannot remove (Python, dispatch, cache bookkeeping), measured in the same conditions.
    """
    import statistics

    from transformers import AutoModelForCausalLM

    from daprune.evaluation.bench import greedy_decode
    from daprune.models.loading import DTYPES, resolve_source

    cfg = _probe_config(resolve_source(baseline).path)
    model = AutoModelForCausalLM.from_config(cfg, dtype=DTYPES[dtype]).to(device).eval()
    prompt = torch.randint(0, cfg.vocab_size, (1, s.seq_len), generator=torch.Generator().manual_seed(0)).to(device)
    greedy_decode(model, prompt, s.new_tokens)
    times = [greedy_decode(model, prompt, s.new_tokens)[1] for _ in range(s.repeats)]
    return {"step_ms": statistics.median(times) / (s.new_tokens - 1) * 1e3, "layers": cfg.num_hidden_layers}


def _probe_config(folder: str):
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(folder)
    for key, value in {"hidden_size": 64, "intermediate_size": 64, "num_attention_heads": 1, "num_key_value_heads": 1,
                       "head_dim": 64, "vocab_size": 256}.items():
        setattr(cfg, key, value)
    return cfg


def ffn_gemv_check(dtype: str, widths: list[int], hidden: int = 576, repeats: int = 7,
                   calls: int = 300, device: str = "cpu") -> dict[str, float]:
    """Batch-1 FFN time (gate + up + down matrix-vector products) per kept width, in microseconds.

    Tells whether widths that are not multiples of 64 cost more than their share (kernel tiling) or
    whether differences between the two pruned models are noise. Widths are interleaved per repeat.
    """
    import statistics

    from daprune.models.loading import DTYPES

    dt, dev = DTYPES[dtype], torch.device(device)
    g = torch.Generator().manual_seed(0)
    mats = {w: (torch.randn(w, hidden, generator=g).to(dev, dt), torch.randn(hidden, w, generator=g).to(dev, dt))
            for w in widths}
    x = torch.randn(1, hidden, generator=g).to(dev, dt)
    times: dict[int, list[float]] = {w: [] for w in widths}
    for _ in range(repeats):
        for w, (up, down) in mats.items():
            h = torch.zeros(1, w, dtype=dt, device=dev)
            _sync(dev)
            t0 = time.perf_counter()
            for _ in range(calls):
                torch.nn.functional.linear(x, up)
                torch.nn.functional.linear(x, up)
                torch.nn.functional.linear(h, down)
            _sync(dev)
            times[w].append((time.perf_counter() - t0) / calls * 1e6)
    return {str(w): statistics.median(v) for w, v in times.items()}


def add_probes(doc: dict, s: BenchSettings, device: str = "cpu") -> None:
    """Attach the overhead probe (one per dtype) to every result, and the FFN width check per dtype."""
    probes: dict[str, dict] = {}
    widths = sorted({w for v in doc["variants"].values() for w in v["prune"]["channels"]} | {896, 1024}, reverse=True)
    for variant in doc["variants"].values():
        for dtype, result in variant["bench"].items():
            if dtype not in probes:
                probes[dtype] = overhead_probe(variant["baseline"], dtype, s, device)
            result["overhead_probe"] = probes[dtype]
    doc["ffn_gemv_us"] = {dtype: ffn_gemv_check(dtype, widths, device=device) for dtype in probes}


def machine() -> dict[str, Any]:
    import os

    return {"cpu": _cpu_name(), "cores": os.cpu_count(), "threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform()}


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def markdown(doc: dict) -> str:
    """docs/speed.md: command, machine, method, one table per (variant, dtype), then the reading of the numbers."""
    m = doc["machine"]
    lines = ["# Speed of pruned models", "",
             "Generated by `benchmarks/speed_bench.py`; all numbers in `docs/speed.json`.",
             "", "```", doc["command"], *([doc["probe_command"]] if "probe_command" in doc else []), "```", "",
             f"Machine: {m['cpu']}, {m['cores']} CPU cores shared with other jobs (load average ~6-7 during the run), "
             f"{m['threads']} torch thread, torch {m['torch']}, {_measured_on(doc)}. Medians of "
             f"{doc['settings']['repeats']} "
             "alternating repeats (dense, pruned, dense, ...) in one process.", "", *_method(), ""]
    for name, variant in doc["variants"].items():
        v = variant["prune"]
        lines += [f"## {name}", "",
                  f"`daprune.api.prune(sparsity={doc['settings']['sparsity']}, channel_multiple={variant['multiple']})`"
                  f" (other settings default): achieved sparsity {v['achieved_sparsity']:.3f}, "
                  f"{'uniform' if v['uniform'] else 'non-uniform (per-layer shapes in config.daprune_layers)'}; "
                  f"{v['heads_removed_blocks']} blocks lost heads; FFN widths {v['channels']}. "
                  f"Pruning took {v['prune_s']:.0f} s.", ""]
        for dtype, result in variant["bench"].items():
            lines += [f"### {dtype}", "", "```", format_bench(result), "```", ""]
    lines += _reading(doc)
    return "\n".join(lines) + "\n"


def _measured_on(doc: dict) -> str:
    """Where the timings ran: no GPU for CPU runs (and JSON from before --device), else the device and GPU name."""
    if doc["settings"].get("device", "cpu") == "cpu":
        return "no GPU"
    envs = [r.get("environment", {}) for v in doc["variants"].values() for r in v["bench"].values()]
    gpu = next((e["gpu"] for e in envs if e.get("gpu")), None)
    return f"timed on {doc['settings']['device']}" + (f" ({gpu})" if gpu else "")


def _method() -> list[str]:
    """How each row is obtained (the same text as daprune.evaluation.bench's docstring, shortened)."""
    return ["`daprune bench --model PRUNED [--baseline DENSE] --dtype D --threads 1` does this measurement for one "
            "pair and one dtype.", "",
            "- parameters: unique (the tied embedding/lm_head once); weight memory: their bytes at the dtype.",
            "- MACs/token at context T = 128: `sum over nn.Linear of in*out` (q, k, v, o, gate, up, down, lm_head) "
            "`+ sum over layers of 2 * n_heads * head_dim * T` (scores and weighted values of one new token over "
            "T cached positions); norms, RoPE, SiLU, softmax and embedding lookups are not counted.",
            "- prefill tok/s: one forward of batch x 128 random tokens (batch 1 and 8), last-position logits only.",
            "- decode tok/s: batch 1, 128-token prompt, then greedy steps with a KV cache (DynamicCache); the 127 "
            "steps after the first new token are timed.",
            "- pruned/dense: for sizes the ratio, for tok/s the speedup = dense median time / pruned median time.",
            "- overhead probe: the same 30-block layout at width 64 and vocabulary 256 (no real weights), decoded "
            "the same way: the per-step cost (Python, dispatch, cache bookkeeping) that pruning cannot remove."]


def _reading(doc: dict) -> list[str]:
    """Table of ratios and the decode decomposition, then the explanation of the gap to the goal."""
    rows = []
    for name, variant in doc["variants"].items():
        for dtype, r in variant["bench"].items():
            sp, b = r["speedup"], decode_breakdown(r)
            probe = (f"{b['fixed_ms']:.1f} | {b['scaling']:.3f} | {b['predicted']:.3f}" if "fixed_ms" in b
                     else "- | - | -")
            rows.append(f"| {name} | {dtype} | {sp['weight_bytes']:.3f} | {sp['macs']:.3f} | {sp['prefill_b1']:.3f} | "
                        f"{sp['prefill_b8']:.3f} | **{sp['decode']:.3f}** ({b['paired_min']:.2f}-{b['paired_max']:.2f})"
                        f" | {b['step_ms_dense']:.1f} / {b['step_ms_pruned']:.1f} | {probe} |")
    return ["## Reading the numbers", "",
            "| variant | dtype | ideal: weight bytes dense/pruned | MACs dense/pruned | prefill b1 | prefill b8 "
            "| decode (paired range) | decode ms/step dense / pruned | fixed ms/step (probe) "
            "| width-dependent part pruned/dense | decode predicted if that part scaled with bytes |",
            "|---|---|---|---|---|---|---|---|---|---|---|", *rows, "", *_gemv_table(doc), *NARRATIVE]


def _gemv_table(doc: dict) -> list[str]:
    """FFN matrix-vector time per kept width, relative to the dense width (1536)."""
    gemv = doc.get("ffn_gemv_us")
    if not gemv:
        return []
    widths = list(next(iter(gemv.values())))
    full = max(widths, key=int)
    lines = ["Batch-1 FFN (gate + up + down) time per width, one thread, relative to width " + full
             + " (`ffn_gemv_us` in the JSON; width ratio in the header):", "",
             "| dtype | " + " | ".join(f"{w} ({int(w) / int(full):.3f})" for w in widths) + " |",
             "|---|" + "---|" * len(widths)]
    for dtype, us in gemv.items():
        lines.append(f"| {dtype} | " + " | ".join(f"{us[w]:.0f} us ({us[w] / us[full]:.3f})" for w in widths) + " |")
    return [*lines, ""]


# Written after the recorded run (docs/speed.json); the table above is regenerated, this text is not.
NARRATIVE = [
    f"**Goal: decode >= {GOAL}x. Not met in this run:** 1.13x (default, channel multiple 1) and 1.19x "
    "(channel multiple 64) in float32, 1.08-1.11x in bfloat16. Prefill gains more: 1.23-1.33x at batch 1.",
    "",
    "**Ceiling.** A batch-1 decode step of a 135M model streams every weight once, so on a memory-bound "
    "machine the best case is the weight-bytes ratio: 1.25x for 20% of the parameters removed (1.28x for the "
    "channel-multiple-64 model, which removes 21.7% so that the budget is still met after rounding). The MACs "
    "ratio is about the same, because the tied embedding is counted once as parameters and the untouched "
    "lm_head matmul (576 x 49152) once as MACs.",
    "",
    "**Why the measured decode speedup is below it:**",
    "",
    "1. *A fixed per-step cost.* The overhead probe decodes the same 30-block layout with no real weights in "
    "~19-20 ms per step, out of 88-118 ms for the dense model in this run: Python and kernel dispatch for "
    "~450 modules, RoPE, KV-cache concatenation, norms. Pruning cannot remove it, so even a remainder that "
    "shrank exactly with the bytes gives only the 'predicted' column, ~1.20x, not 1.25x. A 1.2x goal at "
    "batch 1 through eager transformers on this CPU is therefore right at the ceiling.",
    "2. *Noise on a shared machine.* Other jobs ran during the benchmark (load average ~6-7 on 2 cores, this "
    "process at nice 10 with one thread). Decode repeats of the same model varied by up to ~30% and the "
    "per-repeat dense/pruned ratios (in parentheses) overlap between all four rows; prefill varied by ~5%. "
    "The width-dependent part shrank to 0.79 of dense with channel multiple 64 (as the bytes predict) but "
    "only to 0.87 with channel multiple 1. The FFN width check shows that odd widths cost only a few percent "
    "more than the next multiple of 64 (float32: 1015 -> 0.707 vs 1024 -> 0.675; 887 -> 0.586 vs "
    "896 -> 0.573 of the dense FFN time). So most of the difference between the two float32 decode speedups "
    "is noise, and `--channel-multiple 64` helps a little and removes 1.7% more parameters.",
    "3. *bf16 decode is not bound by bytes here.* Batch-1 bf16 matrix-vector products are no faster than "
    "float32 on this CPU (AVX512-BF16, no AMX: 547 vs 584 us for the dense FFN) and shrink less with the "
    "width (0.77 of the time for 0.66 of the width). Halving the bytes does not help, and removing 20% of the "
    "weights buys ~10%. bf16 does pay off for prefill: 1.3-1.9x faster than float32 here (not the ~4x of large "
    "matmuls).",
    "",
    "**Being non-uniform costs no speed.** With `head_split auto` 2 blocks lost query heads and the FFN "
    "widths differ per block, so both pruned models are non-uniform: saved with `config.daprune_layers` and "
    "`modeling_daprune.py` (for `trust_remote_code`) and loaded here through `daprune.load`, which builds the "
    "standard transformers Llama modules at those shapes: the same kernels as the dense model.",
    "",
    "**Getting to 1.2x:** prune with `--channel-multiple 64` (best decode here), re-measure on an idle machine "
    "to separate the effect from the noise, and cut the per-step overhead (e.g. "
    "`torch.compile` or a static cache), which speeds up dense and pruned alike but raises their ratio towards "
    "the bytes ratio.",
]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render_only:
        Path(args.md).write_text(markdown(json.loads(Path(args.json).read_text())))
        return 0
    try:
        device = resolve_device(args.device)
    except DapruneError as exc:
        print(f"speed_bench: error: {exc}", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    s = BenchSettings(repeats=args.repeats)
    if args.probe_only:  # the probes run where the recorded numbers were measured
        doc = json.loads(Path(args.json).read_text())
        add_probes(doc, s, doc["settings"].get("device", "cpu"))
        doc["probe_command"] = "nice -n 10 python benchmarks/speed_bench.py " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
        Path(args.md).write_text(markdown(doc))
        return 0
    doc: dict[str, Any] = {"command": "nice -n 10 python benchmarks/speed_bench.py " + " ".join(
        shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])), "machine": machine(),
        "settings": {"sparsity": args.sparsity, "repeats": args.repeats, "model": args.model or "default",
                     "device": device},
        "variants": {}}
    for multiple in (int(x) for x in args.channel_multiples.split(",")):
        folder, info = prune_variant(args, multiple)
        baseline = json.loads((folder / "report.json").read_text())["model_source"]["origin"]
        variant = {"multiple": multiple, "prune": info, "folder": str(folder), "baseline": baseline, "bench": {}}
        for dtype in args.dtypes.split(","):
            result = bench_variant(folder, baseline, dtype, s, device)
            variant["bench"][dtype] = result
            print(f"\n== channel multiple {multiple}, {dtype}\n{format_bench(result)}", flush=True)
        doc["variants"][f"channel-multiple {multiple}"] = variant
    add_probes(doc, s, device)
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(doc, indent=2) + "\n")
    Path(args.md).write_text(markdown(doc))
    print(f"\nwrote {args.json} and {args.md}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
