"""Perplexity with the pruning literature's protocol (LLM-Pruner, FLAP, the method's paper).

Rows joined with "\\n\\n", tokenized once, cut into non-overlapping windows of 128 tokens (the tail
that does not fill a window is dropped), perplexity = exp(mean next-token NLL over all windows).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from daprune.data.text import load_text, parse_corpora


def windows(ids: torch.Tensor, seqlen: int = 128, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen]; ``max_windows`` keeps an evenly spaced subset."""
    n = ids.numel() // seqlen
    w = ids[: n * seqlen].view(n, seqlen)
    if max_windows is not None and max_windows < n:
        idx = torch.linspace(0, n - 1, max_windows).round().long()
        w = w[idx]
    return w


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, *, seqlen: int = 128, batch_size: int = 16,
                      max_windows: int | None = None, progress: bool = True, desc: str = "ppl") -> dict:
    wins = windows(ids, seqlen, max_windows)
    dev = next(model.parameters()).device
    nll, count = 0.0, 0
    for s in tqdm(range(0, wins.shape[0], batch_size), desc=desc, disable=not progress):
        batch = wins[s : s + batch_size].to(dev)
        logits = model(input_ids=batch, use_cache=False).logits.float()
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                               reduction="sum")
        nll += float(loss)
        count += batch[:, 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "windows": int(wins.shape[0]), "tokens": count}


def perplexity(model, tokenizer, corpus: str, *, data_dir: str | None = None, seqlen: int = 128,
               batch_size: int = 16, max_windows: int | None = None, progress: bool = True) -> dict:
    text = load_text(corpus, data_dir)
    ids = torch.tensor(tokenizer(text)["input_ids"], dtype=torch.long)
    return perplexity_of_ids(model, ids, seqlen=seqlen, batch_size=batch_size, max_windows=max_windows,
                             progress=progress, desc=f"ppl {corpus}")


def evaluate(model, tokenizer, *, ppl: str = "wikitext2,ptb", data_dir: str | None = None,
             max_windows: int | None = None, batch_size: int = 16, progress: bool = True) -> dict:
    """``{"ppl": {corpus: float}, "ppl_details": {...}}`` for each requested corpus."""
    out: dict = {"ppl": {}, "ppl_details": {}}
    for name in parse_corpora(ppl):
        r = perplexity(model, tokenizer, name, data_dir=data_dir, max_windows=max_windows,
                       batch_size=batch_size, progress=progress)
        out["ppl"][name] = r["ppl"]
        out["ppl_details"][name] = r
    return out
