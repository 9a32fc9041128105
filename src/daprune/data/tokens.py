"""How a model's tokenizer wants a sequence to start: with BOS or without.

Gemma (and Llama-2/3 style tokenizers) put BOS in front of every encoded text and their models are
trained that way: Gemma-3-270M scores 251 on the first WikiText-2 windows without a BOS per window and
41.9 with one. SmolLM2's tokenizer adds none, so its windows stay exactly as the literature cuts them.
Evaluation windows and calibration samples follow the tokenizer's own default, decided here once.
"""

from __future__ import annotations

import torch


def bos_per_window(tokenizer) -> bool:
    """True when the tokenizer adds BOS by default (``tokenizer("a")`` starts with it, or ``add_bos_token``).

    Tokenizers without a BOS id never get one. A tokenizer that cannot encode (a stub) counts as no BOS.
    """
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    if getattr(tokenizer, "add_bos_token", None) is True:
        return True
    try:
        ids = tokenizer("a")["input_ids"]
    except Exception:  # stub tokenizers in tests, tokenizers that need arguments
        return False
    return bool(len(ids)) and int(ids[0]) == int(bos)


def encode_stream(tokenizer, text: str, bos: bool) -> torch.Tensor:
    """Token ids of ``text`` as one stream to cut windows from.

    Without BOS the call is the plain ``tokenizer(text)`` the earlier protocol used (results unchanged);
    with BOS the text is encoded without special tokens, since each window gets its own BOS instead.
    """
    ids = tokenizer(text, add_special_tokens=False)["input_ids"] if bos else tokenizer(text)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def prepend_bos(windows: torch.Tensor, bos_id: int) -> torch.Tensor:
    """``[n, L] -> [n, L + 1]`` with ``bos_id`` in column 0."""
    return torch.cat([torch.full((windows.shape[0], 1), int(bos_id), dtype=windows.dtype), windows], dim=1)
