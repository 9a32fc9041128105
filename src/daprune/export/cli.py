"""``daprune export OUT --gguf FILE``: the CLI plugin (see cli.PLUGINS)."""

from __future__ import annotations

from pathlib import Path

from daprune.export.arch import OUTTYPE_NAMES, ExportError


def add_parser(sub) -> dict:
    p = sub.add_parser("export", help="write a pruned folder as a GGUF file that llama.cpp (and ollama) runs")
    p.add_argument("folder", help="daprune output folder (or any Llama-family Hugging Face folder)")
    p.add_argument("--gguf", required=True, metavar="FILE", help="GGUF file to write")
    p.add_argument("--outtype", choices=OUTTYPE_NAMES, default="f16",
                   help="tensor type of the weights (norms stay f32; q8_0 rows that are not whole 32-blocks: f16)")
    p.add_argument("--tokenizer-gguf", default=None, metavar="FILE",
                   help="copy tokenizer metadata from this GGUF (default: the GGUF the model came from, if any, "
                        "else the folder's tokenizer.json)")
    return {"export": cmd_export}


def cmd_export(args) -> int:
    if not Path(args.folder).is_dir():  # before importing the writer (torch, gguf, transformers: seconds)
        raise ExportError(f"{args.folder} is not a folder")
    from daprune.export.gguf_writer import export_gguf

    res = export_gguf(args.folder, args.gguf, outtype=args.outtype, tokenizer_gguf=args.tokenizer_gguf)
    size = res.path.stat().st_size / 2**20
    print(f"wrote {res.path} ({size:.1f} MiB): architecture {res.arch}, {res.outtype}, {res.tensors} tensors, "
          f"tokenizer from {res.tokenizer_source}")
    if res.arch == "deci":
        print("per-layer heads:", res.per_layer["head_count"])
        print("per-layer FFN:  ", res.per_layer["feed_forward_length"])
    if res.dropped_zero_biases:
        print(f"{len(res.dropped_zero_biases)} all-zero biases left out (llama.cpp's {res.arch} graph reads none)")
    for note in res.notes:
        print("note:", note)
    if res.fallback_f16:
        print(f"{len(res.fallback_f16)} tensors stayed f16 (rows not a multiple of the q8_0 block of 32)")
    return 0
