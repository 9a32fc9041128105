"""How well pruned models copy from their context, next to the dense model (the diagnosis behind ``--copy-rows``).

Two measures per model, each the mean NLL (nats per token) on the second copy of a repeated 64-token segment, where
a model that copies is nearly certain:

- ``random``: 64 uniform token ids from the ordinary range (1000-19999), then the same 64 again (64 rows; the
  classic test of induction heads: nothing but copying predicts them);
- ``text``: 64-token segments of the held-out Wikipedia passages (never calibration rows), each repeated.

And, with ``--wikitext2``, where on WikiText-2's windows a model loses: the perplexity without the tokens " ," and
" ." (this corpus writes a space before every comma and full stop, a house style a model has to pick up from its
context) and the mean NLL on those tokens, by position in the window. That column is test data: it is here to
explain a spread between seeds, and chooses nothing.

    export DAPRUNE_DATA_DIR=/work/shared/data
    python benchmarks/copy_probe.py runs/q512-seeds/seed-{0,1,2,3} --json docs/copy_probe_smollm2.json --wikitext2

The dense model is the one the first folder's report names (the embedded default when none). Rows are keyed by the
folder path and the JSON is rewritten after each model, so a stopped run continues.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch

from daprune.atomic import atomic_write_json

SEGMENT = 64
ROWS = 64
RANDOM_IDS = (1000, 20000)
WT2_WINDOWS = 256
PUNCT = (" ,", " .")


def nll_rows(model, rows: torch.Tensor, batch_size: int = 8) -> torch.Tensor:
    """Per-token NLL [rows, seqlen - 1] of each row's next tokens."""
    out = []
    with torch.no_grad():
        for s in range(0, rows.shape[0], batch_size):
            x = rows[s : s + batch_size]
            logp = torch.log_softmax(model(x).logits[:, :-1].float(), -1)
            out.append(-logp.gather(-1, x[:, 1:, None])[..., 0])
    return torch.cat(out).double()


def copy_rows(tokenizer, data_dir: str | None) -> dict[str, torch.Tensor]:
    """The repeated rows of both measures, built the same way for every model."""
    from daprune.data.text import load_text
    from daprune.data.tokens import encode_stream

    g = torch.Generator().manual_seed(1234)
    rnd = torch.randint(*RANDOM_IDS, (ROWS, SEGMENT), generator=g)
    ids = encode_stream(tokenizer, load_text("wiki-heldout", data_dir), False)
    seg = ids[: ROWS * SEGMENT].reshape(ROWS, SEGMENT)
    return {"random": torch.cat([rnd, rnd], 1), "text": torch.cat([seg, seg], 1)}


def second_copy_nll(nll: torch.Tensor) -> float:
    """Mean NLL of the tokens the second copy predicts (positions SEGMENT..end of the targets)."""
    return float(nll[:, SEGMENT:].mean())


def wikitext2_breakdown(model, tokenizer, data_dir: str | None) -> dict:
    from daprune.data.text import load_text
    from daprune.data.tokens import encode_stream
    from daprune.evaluation.perplexity import windows

    wins = windows(encode_stream(tokenizer, load_text("wikitext2", data_dir), False), 128, WT2_WINDOWS)
    nll = nll_rows(model, wins)
    y = wins[:, 1:]
    punct = torch.zeros_like(y, dtype=torch.bool)
    for s in PUNCT:
        punct |= y == tokenizer.convert_tokens_to_ids(tokenizer.tokenize(s))[-1]
    pos = torch.arange(y.shape[1]).expand_as(y)
    return {"ppl": math.exp(float(nll.mean())), "ppl_without_punct": math.exp(float(nll[~punct].mean())),
            "punct_share": float(punct.double().mean()), "punct_nll": float(nll[punct].mean()),
            "punct_nll_by_position": {f"{a}-{a + 31}": float(nll[punct & (pos >= a) & (pos < a + 32)].mean())
                                      for a in (0, 32, 64, 96)}}


def table(data: dict) -> str:
    lines = ["| model | random, second copy | Wikipedia, second copy | WikiText-2 | without ' ,' ' .' | on ' ,' ' .' |",
             "|---|---|---|---|---|---|"]
    for name, r in data["rows"].items():
        w = r.get("wikitext2")
        tail = f"{w['ppl']:.2f} | {w['ppl_without_punct']:.2f} | {w['punct_nll']:.3f}" if w else "- | - | -"
        lines.append(f"| {name} | {r['random']:.3f} | {r['text']:.3f} | {tail} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from daprune.loader import load_pruned
    from daprune.models.loading import load_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("folders", nargs="+", type=Path, help="pruned model folders")
    ap.add_argument("--json", required=True, type=Path)
    ap.add_argument("--wikitext2", action="store_true", help="also the WikiText-2 breakdown (test data: diagnosis)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    data_dir, cache = os.environ.get("DAPRUNE_DATA_DIR"), os.environ.get("DAPRUNE_CACHE")
    missing = [str(f) for f in args.folders if not (f / "config.json").is_file()]
    if missing:
        raise SystemExit(f"not pruned model folders: {', '.join(missing)}")
    dense_name = json.loads((args.folders[0] / "report.json").read_text())["settings"]["model"]
    data = json.loads(args.json.read_text()) if args.json.is_file() else {
        "dense_model": dense_name, "segment": SEGMENT, "rows": {},
        "measures": "mean NLL (nats) of the second copy of a repeated 64-token segment"}
    dense, tokenizer, _ = load_model(dense_name, dtype="float32", cache=cache)
    dense.eval()
    rows = copy_rows(tokenizer, data_dir)
    for name in ["dense", *map(str, args.folders)]:
        if name in data["rows"] and ("wikitext2" in data["rows"][name] or not args.wikitext2):
            continue
        model = dense if name == "dense" else load_pruned(Path(name), dtype="float32")[0]
        row = {k: second_copy_nll(nll_rows(model, v)) for k, v in rows.items()}
        if args.wikitext2:
            row["wikitext2"] = wikitext2_breakdown(model, tokenizer, data_dir)
        data["rows"][name] = row
        atomic_write_json(args.json, data)
        print(f"{name}: {row['random']:.3f} / {row['text']:.3f}", file=sys.stderr, flush=True)
    print(table(data))
    return 0


if __name__ == "__main__":
    sys.exit(main())
