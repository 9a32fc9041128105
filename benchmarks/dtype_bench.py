"""Compute precision on this machine: one decoder block's forward in float32, bfloat16 and float16.

Why: whether ``--dtype bfloat16`` saves time depends on the CPU. PyTorch's half-precision CPU matmuls are
fast with AVX-512 (bf16/AMX extensions) and several times slower than fp32 on a CPU with AVX2 alone;
``daprune`` warns in that case (:func:`daprune.devices.slow_half_precision`). This measures it, on a block
built from SmolLM2-135M's shapes (random weights: speed depends on shapes, not values; nothing to download).

    python benchmarks/dtype_bench.py --json docs/dtype_speed.json
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import torch
from speed_bench import machine

from daprune.atomic import atomic_write_json
from daprune.devices import slow_half_precision
from daprune.report import format_table

# SmolLM2-135M's decoder block: hidden 576, FFN 1536, 9 query / 3 key-value heads of 64
SHAPES = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3, head_dim=64)


def block_forward_s(dtype: torch.dtype, *, batch: int, seqlen: int, repeats: int) -> float:
    """Best-of-``repeats`` seconds for one block's forward over ``batch`` x ``seqlen`` tokens."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=1, vocab_size=128, **SHAPES)
    config._attn_implementation = "sdpa"
    layer = LlamaDecoderLayer(config, 0).to(dtype).eval()
    x = torch.randn(batch, seqlen, SHAPES["hidden_size"], dtype=dtype)
    position_ids = torch.arange(seqlen).expand(batch, -1)
    rope = LlamaRotaryEmbedding(config)(x, position_ids)
    best = float("inf")
    with torch.no_grad():
        layer(x, position_embeddings=rope, position_ids=position_ids)  # warm-up
        for _ in range(repeats):
            t = time.perf_counter()
            layer(x, position_embeddings=rope, position_ids=position_ids)
            best = min(best, time.perf_counter() - t)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seqlen", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own)")
    parser.add_argument("--json", default=None, help="write the result here (atomically)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    seconds = {name: block_forward_s(getattr(torch, name), batch=args.batch, seqlen=args.seqlen,
                                     repeats=args.repeats) for name in ("float32", "bfloat16", "float16")}
    tokens = args.batch * args.seqlen
    rows = [[name, f"{s * 1e3:.1f}", f"{tokens / s:,.0f}", f"{s / seconds['float32']:.2f}",
             "warned" if slow_half_precision(name, "cpu") else "-"] for name, s in seconds.items()]
    print(format_table(rows, ["dtype", "block forward ms", "tokens/s", "x float32 time", "daprune"]))
    result = {
        "what": "one SmolLM2-135M-shaped decoder block (random weights), forward, best of repeats",
        "command": " ".join(shlex.quote(a) for a in ["python", *sys.argv]),
        "batch": args.batch, "seqlen": args.seqlen, "repeats": args.repeats,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(), "machine": machine(),
        "seconds": seconds, "ratio_to_float32": {k: v / seconds["float32"] for k, v in seconds.items()},
        "warned": {k: slow_half_precision(k, "cpu") is not None for k in seconds},
    }
    if args.json:
        atomic_write_json(Path(args.json), result)
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
