"""Peak memory of pruning vs. model depth: streaming (one block at a time) against in-memory.

Why: the claim of streaming mode is that peak memory is ~ one block + two activation streams + the
embedding, flat in depth, so a model larger than RAM can be pruned. This script measures it on
synthetic random-weight Llama checkpoints of one width and several depths, written shard by shard
(never held in memory whole), each pruned at 20% with random calibration ids in a fresh subprocess.

Peak RSS is measured two ways: the child's own ``ru_maxrss`` (kernel high-water mark of resident
memory) and a parent-side watchdog sampling ``/proc/PID/status`` VmRSS every 20 ms. With
``--limit-gib`` the watchdog SIGKILLs the child as soon as its RSS exceeds the limit (a cgroup-free
stand-in for a memory cap: RLIMIT_AS would count address space, which torch reserves generously
and mmapped safetensors inflate, and would break torch long before RSS reaches the limit).

Examples::

    python benchmarks/memory_bench.py                       # depths 8/16/32, both modes -> docs/scaling.md
    python benchmarks/memory_bench.py --limit-gib 4 --size-gib 8 --modes streaming
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30


# -- synthetic checkpoints -----------------------------------------------------------------------------------
def block_params(hidden: int, inter: int, heads: int, kv: int) -> int:
    hd = hidden // heads
    return 2 * hidden * hidden + 2 * hidden * kv * hd + 3 * hidden * inter + 2 * hidden


def write_synthetic(folder: Path, layers: int, *, hidden: int = 1024, inter: int = 4096, heads: int = 16, kv: int = 4,
                    vocab: int = 32000, seed: int = 0, blocks_per_shard: int = 4) -> int:
    """A random-weight Llama checkpoint in safetensors shards + index, written one block at a time.

    Returns the bytes of weights written. Weights are N(0, 0.02) like a fresh init; norms are U(0.5, 1.5)
    so the activations are not trivially scaled.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    folder.mkdir(parents=True, exist_ok=True)
    hd = hidden // heads
    LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, max_position_embeddings=2048,
                tie_word_embeddings=False).save_pretrained(folder)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * 0.02

    def block(i: int) -> dict:
        p = f"model.layers.{i}."
        return {
            p + "self_attn.q_proj.weight": rnd(heads * hd, hidden),
            p + "self_attn.k_proj.weight": rnd(kv * hd, hidden),
            p + "self_attn.v_proj.weight": rnd(kv * hd, hidden),
            p + "self_attn.o_proj.weight": rnd(hidden, heads * hd),
            p + "mlp.gate_proj.weight": rnd(inter, hidden),
            p + "mlp.up_proj.weight": rnd(inter, hidden),
            p + "mlp.down_proj.weight": rnd(hidden, inter),
            p + "input_layernorm.weight": torch.rand(hidden, generator=g) + 0.5,
            p + "post_attention_layernorm.weight": torch.rand(hidden, generator=g) + 0.5,
        }

    groups: list[list] = [["embed"]] + [list(range(s, min(s + blocks_per_shard, layers)))
                                        for s in range(0, layers, blocks_per_shard)] + [["head"]]
    weight_map, total = {}, 0
    for k, group in enumerate(groups, 1):
        name = f"model-{k:05d}-of-{len(groups):05d}.safetensors"
        tensors: dict = {}
        for item in group:
            if item == "embed":
                tensors["model.embed_tokens.weight"] = rnd(vocab, hidden)
            elif item == "head":
                tensors["model.norm.weight"] = torch.rand(hidden, generator=g) + 0.5
                tensors["lm_head.weight"] = rnd(vocab, hidden)
            else:
                tensors.update(block(item))
        save_file(tensors, str(folder / name), metadata={"format": "pt"})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        weight_map.update({key: name for key in tensors})
        del tensors
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=1))
    return total


# -- the child: one pruning run --------------------------------------------------------------------------------
def child(mode: str, model: str, out: str, nsamples: int, seqlen: int) -> None:
    """Prune once and print a JSON line with the kernel's peak RSS of this process."""
    import torch

    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "1")))
    from daprune.api import prune

    t0 = time.perf_counter()
    kw = dict(calibration="random", nsamples=nsamples, seqlen=seqlen, sparsity=0.2, layers="1:-1", progress=False,
              out=out)
    if mode == "streaming":
        res = prune(model=model, streaming=True, **kw)
    elif mode == "streaming-disk":
        res = prune(model=model, streaming=True, activations="disk", **kw)
    else:  # the in-memory path: the whole dense model loaded, as with --no-streaming
        from transformers import AutoModelForCausalLM

        m = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        res = prune(model=m, tokenizer=None, **kw)
    print(json.dumps({"peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
                      "seconds": time.perf_counter() - t0,
                      "achieved_sparsity": res.report["params"]["achieved_sparsity"]}), flush=True)


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def run_child(mode: str, model: Path, out: Path, args: argparse.Namespace) -> dict:
    """Run one pruning in a fresh interpreter, watching its RSS (and enforcing --limit-gib)."""
    cmd = [sys.executable, __file__, "--child", mode, "--model", str(model), "--out", str(out),
           "--nsamples", str(args.nsamples), "--seqlen", str(args.seqlen)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("BENCH_THREADS", "1"),
           "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    limit_kib = int(args.limit_gib * GIB / 1024) if args.limit_gib else None
    peak = {"kib": 0, "killed": False}

    def watch() -> None:
        while proc.poll() is None:
            rss = _rss_kib(proc.pid)
            peak["kib"] = max(peak["kib"], rss)
            if limit_kib is not None and rss > limit_kib:
                peak["killed"] = True
                proc.send_signal(signal.SIGKILL)
                return
            time.sleep(0.02)

    t = threading.Thread(target=watch, daemon=True)
    t0 = time.perf_counter()
    t.start()
    stdout, stderr = proc.communicate()
    t.join()
    row = {"mode": mode, "returncode": proc.returncode, "sampled_peak_rss_gib": peak["kib"] / 2**20,
           "killed_by_watchdog": peak["killed"], "wall_s": time.perf_counter() - t0}
    lines = [ln for ln in stdout.splitlines() if ln.startswith("{")]
    if lines:
        res = json.loads(lines[-1])
        row.update(peak_rss_gib=res["peak_rss_kib"] / 2**20, seconds=res["seconds"],
                   achieved_sparsity=res["achieved_sparsity"])
    else:
        row["stderr_tail"] = stderr[-1500:]
    return row


# -- driver ----------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--depths", default="8,16,32", help="block counts of the synthetic checkpoints")
    p.add_argument("--modes", default="streaming,memory", help="streaming | streaming-disk | memory")
    p.add_argument("--hidden", type=int, default=1024)
    p.add_argument("--inter", type=int, default=4096)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--nsamples", type=int, default=8, help="calibration samples (x seqlen must be >= hidden)")
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--size-gib", type=float, default=None,
                   help="instead of --depths: one checkpoint with about this many GiB of weights")
    p.add_argument("--limit-gib", type=float, default=None, help="kill a run whose RSS exceeds this")
    p.add_argument("--tmp", default=None, help="where checkpoints are written (default: a temp dir)")
    p.add_argument("--json", default=None, help="write the rows as JSON")
    p.add_argument("--md", default=None, help="append a markdown table to this file")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--model", default=None, help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args.child, args.model, args.out, args.nsamples, args.seqlen)
        return 0
    shape = dict(hidden=args.hidden, inter=args.inter, heads=args.heads, kv=args.kv, vocab=args.vocab)
    per_block = block_params(args.hidden, args.inter, args.heads, args.kv) * 4
    if args.size_gib:
        embed = 2 * args.vocab * args.hidden * 4
        depths = [max(1, math.ceil((args.size_gib * GIB - embed) / per_block))]
    else:
        depths = [int(d) for d in args.depths.split(",")]
    modes = args.modes.split(",")
    base = Path(args.tmp) if args.tmp else Path(tempfile.mkdtemp(prefix="daprune-membench-"))
    rows = []
    try:
        for depth in depths:
            folder = base / f"llama-{depth}"
            t = time.perf_counter()
            size = write_synthetic(folder, depth, **shape)
            print(f"wrote {depth} blocks, {size / GIB:.2f} GiB of weights in {time.perf_counter() - t:.0f} s",
                  flush=True)
            for mode in modes:
                out = base / f"out-{depth}-{mode}"
                row = {"blocks": depth, "weights_gib": size / GIB, **run_child(mode, folder, out, args)}
                rows.append(row)
                print(json.dumps(row), flush=True)
                shutil.rmtree(out, ignore_errors=True)
                shutil.rmtree(str(out) + ".daprune-work", ignore_errors=True)
            shutil.rmtree(folder, ignore_errors=True)
    finally:
        if not args.tmp:
            shutil.rmtree(base, ignore_errors=True)
    table = render(rows, args)
    print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    if args.md:
        with open(args.md, "a") as fh:
            fh.write(table + "\n")
    return 0


def render(rows: list[dict], args: argparse.Namespace) -> str:
    head = ("| blocks | weights (GiB) | mode | peak RSS ru_maxrss (GiB) | peak RSS sampled (GiB) | time (s) | "
            "result |\n|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        result = "ok" if r["returncode"] == 0 else ("killed: over the limit" if r["killed_by_watchdog"]
                                                    else f"exit {r['returncode']}")
        nan = float("nan")
        lines.append(f"| {r['blocks']} | {r['weights_gib']:.2f} | {r['mode']} | {r.get('peak_rss_gib', nan):.2f}"
                     f" | {r['sampled_peak_rss_gib']:.2f} | {r.get('seconds', r['wall_s']):.0f} | {result} |")
    if args.limit_gib:
        lines.append(f"\nRSS limit enforced by the watchdog: {args.limit_gib} GiB")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
