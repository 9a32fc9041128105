"""Perplexity with the pruning literature's protocol (LLM-Pruner, FLAP, the method's paper).

Rows joined with "\\n\\n", tokenized once, cut into non-overlapping windows of 128 tokens (the tail
that does not fill a window is dropped), perplexity = exp(mean next-token NLL over all windows).

Where the model's tokenizer adds BOS by default (Gemma), each window is fed as BOS + its 128 tokens and
the same 127 next-token targets are scored (BOS is context only), so window count and targets do not
depend on the tokenizer; SmolLM2's tokenizer adds none and its windows are unchanged.

Memory: full-vocabulary fp32 logits of a whole batch (16 x 128 x 152k = 1.2 GB for Qwen2, twice that
inside cross-entropy) dominated evaluation. The loss is computed from the decoder's final hidden states
with the LM head applied to chunks of positions, so at most ``_CHUNK_ELEMENTS`` logits exist at a time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from daprune.data.text import check_corpora, load_text
from daprune.data.tokens import bos_per_window, encode_stream, prepend_bos

# logits materialised at once: 16M fp32 values = 64 MB (~330 positions of a 49k vocabulary)
_CHUNK_ELEMENTS = 1 << 24


def windows(ids: torch.Tensor, seqlen: int = 128, max_windows: int | None = None) -> torch.Tensor:
    """Non-overlapping windows [n, seqlen]; ``max_windows`` keeps an evenly spaced subset."""
    n = ids.numel() // seqlen
    w = ids[: n * seqlen].view(n, seqlen)
    if max_windows is not None and max_windows < n:
        idx = torch.linspace(0, n - 1, max_windows).round().long()
        w = w[idx]
    return w


def _head_logits(model, head, hidden: torch.Tensor) -> torch.Tensor:
    """The CausalLM head on hidden states, with Gemma-2 style final soft-capping where configured."""
    logits = head(hidden)
    cap = getattr(model.config, "final_logit_softcapping", None)
    if cap:
        logits = torch.tanh(logits / cap) * cap
    return logits


class _ChunkedLoss:
    """Summed next-token NLL of a batch without materialising the batch's full logits.

    The chunked path (decoder hidden states, then the head per chunk of positions) is checked once
    against the model's own forward on the first window; a model whose head does more than the
    ``_head_logits`` mapping (logit scales of other families) falls back to one window at a time.
    """

    def __init__(self, model, offset: int):
        self.model = model
        self.offset = offset  # 1 when column 0 is a BOS that is context only
        self.head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        self.decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
        self.chunked: bool | None = None if (self.head is not None and self.decoder is not None) else False

    def _hidden(self, batch: torch.Tensor) -> torch.Tensor:
        return self.decoder(input_ids=batch, use_cache=False).last_hidden_state

    def _check(self, batch: torch.Tensor) -> bool:
        ref = self.model(input_ids=batch[:1], use_cache=False).logits[0, -4:].float()
        got = _head_logits(self.model, self.head, self._hidden(batch[:1])[0, -4:]).float()
        return got.shape == ref.shape and torch.allclose(got, ref, rtol=1e-3, atol=1e-3)

    def __call__(self, batch: torch.Tensor) -> float:
        if self.chunked is None:
            self.chunked = self._check(batch)
        o = self.offset
        if not self.chunked:
            total = 0.0
            for row in batch:
                logits = self.model(input_ids=row[None], use_cache=False).logits[0, o:-1].float()
                total += float(F.cross_entropy(logits, row[o + 1:], reduction="sum"))
            return total
        hidden = self._hidden(batch)[:, o:-1]
        hidden = hidden.reshape(-1, hidden.shape[-1])
        targets = batch[:, o + 1:].reshape(-1)
        vocab = self.head.weight.shape[0]
        step = max(1, _CHUNK_ELEMENTS // vocab)
        total = 0.0
        for s in range(0, hidden.shape[0], step):
            logits = _head_logits(self.model, self.head, hidden[s : s + step]).float()
            total += float(F.cross_entropy(logits, targets[s : s + step], reduction="sum"))
        return total


@torch.no_grad()
def perplexity_of_ids(model, ids: torch.Tensor, *, seqlen: int = 128, batch_size: int = 16,
                      max_windows: int | None = None, progress: bool = True, desc: str = "ppl",
                      bos_id: int | None = None) -> dict:
    """Perplexity of ``ids`` cut into windows; ``bos_id``: feed BOS before each window (context only)."""
    wins = windows(ids, seqlen, max_windows)
    if bos_id is not None:
        wins = prepend_bos(wins, bos_id)
    dev = next(model.parameters()).device
    loss = _ChunkedLoss(model, offset=1 if bos_id is not None else 0)
    nll, count = 0.0, 0
    for s in tqdm(range(0, wins.shape[0], batch_size), desc=desc, disable=not progress):
        batch = wins[s : s + batch_size].to(dev)
        nll += loss(batch)
        count += batch[:, loss.offset + 1:].numel()
    return {"ppl": math.exp(nll / count), "nll": nll / count, "windows": int(wins.shape[0]), "tokens": count,
            "bos_per_window": bos_id is not None}


def perplexity(model, tokenizer, corpus: str, *, data_dir: str | None = None, seqlen: int = 128,
               batch_size: int = 16, max_windows: int | None = None, progress: bool = True) -> dict:
    text = load_text(corpus, data_dir)
    bos = bos_per_window(tokenizer)
    ids = encode_stream(tokenizer, text, bos)
    return perplexity_of_ids(model, ids, seqlen=seqlen, batch_size=batch_size, max_windows=max_windows,
                             progress=progress, desc=f"ppl {corpus}", bos_id=tokenizer.bos_token_id if bos else None)


def evaluate(model, tokenizer, *, ppl: str = "wikitext2,ptb", data_dir: str | None = None,
             max_windows: int | None = None, batch_size: int = 16, progress: bool = True) -> dict:
    """``{"ppl": {corpus: float}, "ppl_details": {...}, "bos_per_window": bool}`` for each requested corpus."""
    out: dict = {"ppl": {}, "ppl_details": {}, "bos_per_window": bos_per_window(tokenizer)}
    for name in check_corpora(ppl, data_dir, max_windows, read=False):
        r = perplexity(model, tokenizer, name, data_dir=data_dir, max_windows=max_windows,
                       batch_size=batch_size, progress=progress)
        out["ppl"][name] = r["ppl"]
        out["ppl_details"][name] = r
    return out
