"""Which llama.cpp pre-tokenizer a ``tokenizer.json`` describes (the GGUF key ``tokenizer.ggml.pre``).

llama.cpp does not read a tokenizer's splitting rules from the GGUF: it reads a name and applies the regexes it
has for that name. A byte-level BPE vocabulary written under the wrong name still loads, then splits text into
other pieces than the model was trained on (``default`` splits punctuation runs and 3-digit groups apart, which
no Hugging Face tokenizer does), so the model reads other tokens in llama.cpp than in transformers, silently.

llama.cpp's own converter recognises a tokenizer by hashing how it tokenizes a probe string. Here the
pre-tokenizer is read from ``tokenizer.json`` instead: each splitting step (a ``Split`` regex, ``Digits``,
``ByteLevel``'s built-in regex) becomes one regex, and the list is compared with the regexes each name applies, as
Hugging Face writes them (llama.cpp's are rewritten for its regex engine, without ``(?i:``). Only names whose
tokenization was compared with transformers' in llama.cpp (tests/test_export_tokenizer.py) are in the table; any
other pre-tokenizer is refused with the way out (``--tokenizer-gguf``), never written under a guessed name.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from daprune.export.arch import ExportError

# the regex of tokenizers' ByteLevel(use_regex=True): GPT-2's
GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Llama-3's Split (tiktoken's cl100k pattern); Qwen2's differs only in taking digits one at a time
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
          r"|\s+(?!\S)|\s+")
QWEN2 = LLAMA3.replace(r"\p{N}{1,3}", r"\p{N}")
# Mistral's tekken (Nemo, Small 3): words split at case changes, digits one at a time, no contractions
TEKKEN = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
          r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*|\p{N}"
          r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")
DIGIT = r"\p{N}"  # Digits(individual_digits=True)
DIGITS = r"\p{N}+"  # Digits(individual_digits=False)


@dataclass(frozen=True)
class PreTokenizer:
    """A llama.cpp pre-tokenizer name and what a tokenizer.json must hold to be tokenized alike under it."""

    name: str
    splits: tuple[str, ...]  # the splitting regexes, in order, before the byte-level mapping
    ignore_merges: bool  # llama.cpp sets BPE's ignore_merges from the name alone (true for llama-bpe)


KNOWN: tuple[PreTokenizer, ...] = (
    PreTokenizer("gpt-2", (GPT2,), False),  # GPT-2, OPT, Phi-2
    PreTokenizer("smollm", (DIGIT, GPT2), False),  # SmolLM / SmolLM2, StarCoder
    PreTokenizer("llama-bpe", (LLAMA3,), True),  # Llama-3.x
    # Llama-3's splits with every merge applied: tokenizer.json files saved before tokenizers 0.19 had no
    # ignore_merges, and transformers then tokenizes them so (Smaug, and Llama-3 files of that time)
    PreTokenizer("smaug-bpe", (LLAMA3,), False),
    PreTokenizer("qwen2", (QWEN2,), False),  # Qwen2 / Qwen2.5 / Qwen3
    PreTokenizer("tekken", (TEKKEN,), True),  # Mistral Nemo, Mistral Small 3
)
NORMALIZERS_IGNORED = (None, "NFC")  # llama.cpp applies no normalizer; NFC text (the usual) is unchanged by NFC


def _flat(node: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The pre-tokenizer's steps in order, nested Sequences flattened."""
    if node is None:
        return []
    if not isinstance(node, dict):
        raise ExportError(f"tokenizer.json's pre-tokenizer step {node!r} is not a JSON object")
    if node.get("type") == "Sequence":
        return [step for child in node.get("pretokenizers") or [] for step in _flat(child)]
    return [node]


def _regexes(step: dict[str, Any]) -> list[str]:
    """The splitting regexes of one pre-tokenizer step; ExportError for a step with no llama.cpp counterpart."""
    kind = step.get("type")
    if kind == "ByteLevel":
        if step.get("add_prefix_space"):
            raise ExportError("tokenizer.json's ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's "
                              "byte-level BPE does not")
        return [GPT2] if step.get("use_regex", True) else []
    if kind == "Digits":
        return [DIGIT if step.get("individual_digits") else DIGITS]
    if kind == "Split":
        pattern = step.get("pattern")
        if not isinstance(pattern, dict) or "Regex" not in pattern or step.get("behavior") != "Isolated" \
                or step.get("invert"):
            raise ExportError(f"tokenizer.json's Split pre-tokenizer ({pattern}, behavior {step.get('behavior')}, "
                              f"invert {step.get('invert')}) is not an isolating regex split, which is all llama.cpp "
                              "applies")
        return [pattern["Regex"]]
    raise ExportError(f"tokenizer.json's pre-tokenizer {kind!r} has no llama.cpp counterpart")


def pre_tokenizer_name(tokenizer_json: dict[str, Any]) -> str:
    """The ``tokenizer.ggml.pre`` under which llama.cpp splits text as this byte-level BPE tokenizer.json does.

    Refused (ExportError, naming ``--tokenizer-gguf``) when no name in ``KNOWN`` matches: the splitting regexes,
    the byte-level mapping, the normalizer and ``ignore_merges`` all have to agree.
    """
    way_out = ("; llama.cpp would split text differently from transformers. Export with --tokenizer-gguf FILE, a GGUF "
               "of the base model, whose tokenizer keys are copied as they are")
    normalizer = tokenizer_json.get("normalizer")
    normalizer = normalizer.get("type") if isinstance(normalizer, dict) else normalizer
    if normalizer not in NORMALIZERS_IGNORED:
        raise ExportError(f"tokenizer.json has a {normalizer} normalizer, which llama.cpp does not apply" + way_out)
    try:
        steps = _flat(tokenizer_json.get("pre_tokenizer"))
        splits = tuple(regex for step in steps for regex in _regexes(step))
    except ExportError as exc:
        raise ExportError(str(exc) + way_out) from None
    kinds = [step.get("type") for step in steps]
    if "ByteLevel" not in kinds:
        raise ExportError("tokenizer.json's pre-tokenizer has no ByteLevel step, so its vocabulary is not in the "
                          "byte-level alphabet llama.cpp's BPE maps text into" + way_out)
    if kinds.count("ByteLevel") > 1 or kinds[-1] != "ByteLevel":  # a split after it would see mapped bytes (Ġ)
        raise ExportError("tokenizer.json's pre-tokenizer splits after its ByteLevel step, on byte-mapped text, "
                          "where llama.cpp splits the text itself" + way_out)
    ignore_merges = bool((tokenizer_json.get("model") or {}).get("ignore_merges", False))
    for known in KNOWN:
        if known.splits == splits and known.ignore_merges == ignore_merges:
            return known.name
    names = ", ".join(k.name for k in KNOWN)
    raise ExportError(f"tokenizer.json's pre-tokenizer (splits {list(splits)}, ignore_merges {ignore_merges}) is none "
                      f"of those daprune maps to llama.cpp ({names})" + way_out)
