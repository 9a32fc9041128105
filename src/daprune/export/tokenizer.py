"""Tokenizer metadata for the GGUF: copied from the source GGUF when there is one, else from tokenizer.json.

Copying the source GGUF's ``tokenizer.*`` keys keeps exactly what llama.cpp used for the original model
(pre-tokenizer name, token types, chat template); rebuilding them from tokenizer.json is the fallback for
models that never were GGUFs, and handles byte-level BPE ("gpt2") tokenizers whose pre-tokenizer llama.cpp
names (export/pretokenizer.py) only.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from gguf import GGUFReader, GGUFValueType, TokenType

from daprune.errors import DapruneError
from daprune.export.arch import ExportError
from daprune.export.pretokenizer import pre_tokenizer_name

Field = tuple[str, Any, GGUFValueType, GGUFValueType | None]  # key, value, type, array element type


def source_gguf(folder: Path, _depth: int = 0) -> Path | None:
    """The GGUF a folder was pruned from (report.json's model setting), or converted from (cache marker), followed
    through pruned folders used as sources (each one's report.json names the folder it came from)."""
    marker = folder / "daprune_source.json"
    if marker.is_file():
        path = Path(json.loads(marker.read_text()).get("gguf", ""))
        return path if path.is_file() else None
    report = folder / "report.json"
    if not report.is_file():
        return None
    model = json.loads(report.read_text()).get("settings", {}).get("model")
    if model in (None, "default", "smollm2-135m-instruct"):
        from daprune.models.loading import default_gguf_path

        try:
            return default_gguf_path()
        except DapruneError:
            return None
    path = Path(str(model)).expanduser()
    if path.suffix == ".gguf" and path.is_file():
        return path
    if path.is_dir() and _depth < 16:  # pruned from a converted folder, or from an earlier prune of one
        return source_gguf(path, _depth + 1)
    return None


def from_gguf(path: Path) -> list[Field]:
    """Every ``tokenizer.*`` key of a GGUF file, with its exact value types."""
    reader = GGUFReader(path)
    fields: list[Field] = []
    for key, field in reader.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == GGUFValueType.ARRAY else None
        fields.append((key, field.contents(), vtype, sub))
    if not any(k == "tokenizer.ggml.tokens" for k, *_ in fields):
        raise ExportError(f"{path} has no tokenizer.ggml.tokens")
    return fields


def from_tokenizer_json(folder: Path, vocab_size: int) -> list[Field]:
    """Byte-level BPE metadata (``gpt2`` model in llama.cpp) from ``tokenizer.json`` and its config, under the
    pre-tokenizer name that splits text as it does (refused when none does)."""
    tj_path = folder / "tokenizer.json"
    if not tj_path.is_file():
        raise ExportError(f"{folder} has no tokenizer.json and no source GGUF; pass --tokenizer-gguf FILE")
    try:
        tj = json.loads(tj_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"cannot read {tj_path}: {exc}") from None
    if not isinstance(tj, dict):
        raise ExportError(f"{tj_path} is not a tokenizer file as tokenizers writes one (not a JSON object)")
    model = tj.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise ExportError(f"tokenizer.json holds a {model.get('type')} tokenizer; only byte-level BPE is rebuilt "
                          "(export from a GGUF source with --tokenizer-gguf FILE)")
    pre = pre_tokenizer_name(tj)
    try:
        tokens: dict[int, str] = {int(i): str(t) for t, i in model["vocab"].items()}
        types: dict[int, int] = dict.fromkeys(tokens, TokenType.NORMAL)
        for added in tj.get("added_tokens") or []:
            tokens[int(added["id"])] = str(added["content"])
            types[int(added["id"])] = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise ExportError(f"{tj_path} is not a tokenizer file as tokenizers writes one ({exc!r})") from None
    size = max(vocab_size, max(tokens) + 1)
    names = [tokens.get(i, f"[PAD{i}]") for i in range(size)]  # the embedding may be padded past the vocabulary
    kinds = [int(types.get(i, TokenType.UNUSED)) for i in range(size)]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    fields: list[Field] = [
        ("tokenizer.ggml.model", "gpt2", GGUFValueType.STRING, None),
        ("tokenizer.ggml.pre", pre, GGUFValueType.STRING, None),
        ("tokenizer.ggml.tokens", names, GGUFValueType.ARRAY, GGUFValueType.STRING),
        ("tokenizer.ggml.token_type", kinds, GGUFValueType.ARRAY, GGUFValueType.INT32),
        ("tokenizer.ggml.merges", merges, GGUFValueType.ARRAY, GGUFValueType.STRING),
    ]
    fields += _special_ids(folder)
    return fields


def _special_ids(folder: Path) -> list[Field]:
    """BOS/EOS/UNK/PAD ids and whether BOS is added, as the folder's transformers tokenizer has them."""
    from transformers import AutoTokenizer

    from daprune.data.tokens import bos_per_window

    tok = AutoTokenizer.from_pretrained(folder)
    out: list[Field] = []
    for name, key in (("bos", "bos_token_id"), ("eos", "eos_token_id"), ("unk", "unknown_token_id"),
                      ("pad", "padding_token_id")):
        value = getattr(tok, f"{name}_token_id", None)
        if value is not None:
            out.append((f"tokenizer.ggml.{key}", int(value), GGUFValueType.UINT32, None))
    out.append(("tokenizer.ggml.add_bos_token", bos_per_window(tok), GGUFValueType.BOOL, None))
    template = getattr(tok, "chat_template", None)
    if isinstance(template, str):
        out.append(("tokenizer.chat_template", template, GGUFValueType.STRING, None))
    return out


def tokenizer_fields(folder: Path, vocab_size: int, gguf_path: Path | None = None) -> tuple[list[Field], str]:
    """Metadata fields and where they came from (a GGUF path or ``tokenizer.json``), for an embedding of
    ``vocab_size`` rows: refused when the token count differs, as llama.cpp sizes ``token_embd`` by the tokens and
    would not load the file."""
    src = gguf_path or source_gguf(folder)
    fields = from_gguf(Path(src)) if src is not None else from_tokenizer_json(folder, vocab_size)
    where = str(src) if src is not None else "tokenizer.json"
    n_tokens = next(len(v) for k, v, *_ in fields if k == "tokenizer.ggml.tokens")
    if n_tokens != vocab_size:
        raise ExportError(f"the tokenizer ({where}) has {n_tokens} tokens and the embedding {vocab_size} rows; "
                          "llama.cpp would not load the GGUF (pass --tokenizer-gguf FILE with this model's own "
                          "tokenizer)")
    return fields, where
