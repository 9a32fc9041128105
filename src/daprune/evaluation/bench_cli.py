"""``daprune bench``: the CLI plugin (see cli.PLUGINS) for :mod:`daprune.evaluation.bench`.

Kept apart from the measuring code so that listing the commands, ``--help`` and a refused setting cost no
torch import: the settings are checked first, the models loaded after.
"""

from __future__ import annotations

from pathlib import Path

from daprune.atomic import atomic_write_json
from daprune.errors import ConfigError


def add_parser(sub) -> dict:
    p = sub.add_parser("bench", help="parameters, MACs, memory and measured speed: pruned vs dense original")
    p.add_argument("--model", required=True, help="pruned model folder (written by daprune prune)")
    p.add_argument("--baseline", default=None,
                   help="dense model to compare with (default: the model source in MODEL/report.json)")
    p.add_argument("--json", default=None, help="write the results as JSON (atomically)")
    p.add_argument("--repeats", type=int, default=5, help="timed runs per model and measurement (median reported)")
    p.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--seq-len", type=int, default=128, help="prefill/prompt length and the context for MACs")
    p.add_argument("--new-tokens", type=int, default=128, help="greedy decode steps")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads (default: torch's); on a shared machine fewer threads than busy cores is steadier")
    p.add_argument("--cache-dir", default=None, help="where converted models are cached ($DAPRUNE_CACHE)")
    return {"bench": cmd_bench}


def cmd_bench(args) -> int:
    if args.threads is not None and args.threads < 1:
        raise ConfigError("--threads must be >= 1")
    if args.repeats < 1 or args.seq_len < 1 or args.new_tokens < 2:
        raise ConfigError("--repeats and --seq-len must be >= 1, --new-tokens >= 2")
    if args.json:  # its folder now, not after the timing runs
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    import torch

    from daprune.evaluation.bench import (
        BenchSettings,
        baseline_source,
        bench_models,
        format_bench,
        load_for_bench,
        resolve_device,
    )

    baseline = args.baseline or baseline_source(args.model)
    device = resolve_device(args.device)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    s = BenchSettings(seq_len=args.seq_len, new_tokens=args.new_tokens, repeats=args.repeats)
    dense = load_for_bench(baseline, args.dtype, device, args.cache_dir)
    pruned = load_for_bench(args.model, args.dtype, device, args.cache_dir)
    result = bench_models(dense, pruned, s)
    result["models"] = {"dense": baseline, "pruned": args.model}
    print(f"dense {baseline}  vs  pruned {args.model}  ({result['environment']['dtype']}, {device}, "
          f"threads={result['environment']['threads']}, median of {s.repeats})")
    print(format_bench(result))
    if args.json:
        atomic_write_json(Path(args.json), result, indent=2, sort_keys=False)
    return 0
