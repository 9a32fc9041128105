"""The GGUF's pre-tokenizer name, rebuilt from tokenizer.json: llama.cpp must split text as transformers does.

Tokenizers are trained here (byte-level BPE, a few hundred merges) and given the pre-tokenizers of GPT-2, SmolLM,
Llama-3 and Qwen2 as their tokenizer.json files state them. The llama.cpp test is the independent check: the same
texts tokenized by llama.cpp from the exported GGUF and by transformers from the folder give the same ids, and
under every other name, ``default`` (written before this check existed) included, they do not.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from conftest import tiny_model

pytest.importorskip("gguf")
tokenizers = pytest.importorskip("tokenizers")

from daprune.export.arch import ExportError  # noqa: E402
from daprune.export.pretokenizer import LLAMA3, QWEN2, TEKKEN, pre_tokenizer_name  # noqa: E402

# contractions in both cases, digit runs, punctuation runs, whitespace runs, CR/LF, accents, CJK, emoji
TEXTS = [
    "Hello world, this is a test.",
    "I'm sure they'll say it's 1234567 or 3.14159!!! DON'T YOU'LL",
    "  two  spaces\n\nnew lines\r\n and\ttabs   at the end   ",
    "naïve café — déjà vu, façade; Ünïcödé",
    "x = a+b; // comment??? <tag attr=\"v\">...</tag> $100,000.00",
    "日本語のテキスト 123 中文 한국어",
    "emoji 🙂🙂 ok :) 2024-12-07 09:30:00",
    "say qwertyuiop, then qwertyuiop again",  # a whole word in the vocabulary that no merge sequence reaches
    "\n\n\n   \t\n",
    "camelCaseWords getHTTPResponse ÜBER Straße naïveTÉST ΑΒΓ αβγ ΣΊΣΥΦΟΣ İstanbul ıi ŒUVRE œuvre",
]
# llama.cpp's names for the pre-tokenizers _pre builds
NAMES = ["gpt-2", "smollm", "llama-bpe", "smaug-bpe", "qwen2", "tekken"]
CORPUS = [t * 3 for t in TEXTS if "qwertyuiop" not in t] + [f"{w} {n} {w.upper()}'S" for n in range(0, 3000, 7)
                                   for w in ("alpha", "beta", "gamma", "they've", "we'd")]


def _pre(kind: str):
    from tokenizers import Regex
    from tokenizers import pre_tokenizers as pt

    byte_level = pt.ByteLevel(add_prefix_space=False, use_regex=False)
    return {
        "gpt-2": pt.ByteLevel(add_prefix_space=False, use_regex=True),
        "smollm": pt.Sequence([pt.Digits(individual_digits=True), pt.ByteLevel(add_prefix_space=False)]),
        "llama-bpe": pt.Sequence([pt.Split(Regex(LLAMA3), behavior="isolated"), byte_level]),
        "smaug-bpe": pt.Sequence([pt.Split(Regex(LLAMA3), behavior="isolated"), byte_level]),
        "qwen2": pt.Sequence([pt.Split(Regex(QWEN2), behavior="isolated"), byte_level]),
        "tekken": pt.Sequence([pt.Split(Regex(TEKKEN), behavior="isolated"), byte_level]),
        "whitespace": pt.Whitespace(),
        "split-only": pt.Split(Regex(LLAMA3), behavior="isolated"),
        "prefix-space": pt.ByteLevel(add_prefix_space=True),
        "digits-grouped": pt.Sequence([pt.Digits(individual_digits=False), pt.ByteLevel(add_prefix_space=False)]),
        "removed-split": pt.Sequence([pt.Split(Regex(LLAMA3), behavior="removed"), byte_level]),
    }[kind]


def trained(kind: str, ignore_merges: bool | None = None, normalizer=None, vocab: int = 600):
    """A byte-level BPE tokenizer with pre-tokenizer ``kind`` (ignore_merges as Llama-3 ships).

    Its merges are learned under GPT-2's splitting whatever ``kind`` is, so the vocabulary holds pieces (digit runs,
    a space before a digit) that only some pre-tokenizers let a text reach: the same vocabulary tokenizes differently
    under each name, which lets a test tell the names apart."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if ignore_merges is None:
        ignore_merges = kind in ("llama-bpe", "tekken")
    tok = Tokenizer(models.BPE(ignore_merges=ignore_merges))
    tok.pre_tokenizer = _pre("gpt-2")
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    # a vocabulary entry outside the merges (as vocabularies edited by hand have): only ignore_merges emits it whole
    state = json.loads(tok.to_str())
    state["model"]["vocab"]["Ġqwertyuiop"] = len(state["model"]["vocab"])
    tok = Tokenizer.from_str(json.dumps(state))
    tok.pre_tokenizer = _pre(kind)
    if normalizer is not None:
        tok.normalizer = normalizer
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")


def folder_with(tok, path: Path) -> Path:
    """A tiny Llama whose embedding has one row per token of ``tok``, saved with it."""
    tiny_model(layers=1, heads=2, kv=1, hidden=16, inter=32, vocab=len(tok)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def tokenizer_json(tok, tmp_path: Path) -> dict:
    tok.save_pretrained(tmp_path / "tok")
    return json.loads((tmp_path / "tok" / "tokenizer.json").read_text())


@pytest.mark.parametrize("kind", NAMES)
def test_each_known_pre_tokenizer_is_named(kind, tmp_path):
    assert pre_tokenizer_name(tokenizer_json(trained(kind), tmp_path)) == kind


def test_qwen2_nfc_normalizer_is_accepted(tmp_path):
    from tokenizers import normalizers

    assert pre_tokenizer_name(tokenizer_json(trained("qwen2", normalizer=normalizers.NFC()), tmp_path)) == "qwen2"


@pytest.mark.parametrize("kind, ignore_merges, normalizer, why", [
    ("whitespace", False, None, "'Whitespace' has no llama.cpp counterpart"),
    ("split-only", True, None, "no ByteLevel step"),
    ("prefix-space", False, None, "prefix space"),
    ("digits-grouped", False, None, "none of those"),
    ("removed-split", False, None, "not an isolating regex split"),
    ("qwen2", True, None, "ignore_merges True"),  # Qwen2's splits, but llama.cpp's qwen2 applies every merge
    ("gpt-2", False, "lowercase", "Lowercase normalizer"),
])
def test_pre_tokenizers_llamacpp_would_split_otherwise_are_refused(kind, ignore_merges, normalizer, why, tmp_path):
    from tokenizers import normalizers

    norm = normalizers.Lowercase() if normalizer == "lowercase" else None
    tj = tokenizer_json(trained(kind, ignore_merges=ignore_merges, normalizer=norm), tmp_path)
    with pytest.raises(ExportError, match=why) as err:
        pre_tokenizer_name(tj)
    assert "--tokenizer-gguf" in str(err.value)


def test_export_writes_the_name_and_refuses_before_writing(tmp_path, one_thread):
    from gguf import GGUFReader

    from daprune.export.gguf_writer import export_gguf

    folder = folder_with(trained("qwen2"), tmp_path / "qwen2")
    export_gguf(folder, tmp_path / "m.gguf")
    assert GGUFReader(tmp_path / "m.gguf").fields["tokenizer.ggml.pre"].contents() == "qwen2"
    bad = folder_with(trained("whitespace"), tmp_path / "ws")
    with pytest.raises(ExportError, match="no llama.cpp counterpart"):
        export_gguf(bad, tmp_path / "bad.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "qwen2", "ws"]  # nothing half-written


def _llamacpp_ids(llama_cpp, path: Path) -> list[list[int]]:
    llm = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    try:
        return [llm.tokenize(t.encode(), add_bos=False, special=False) for t in TEXTS]
    finally:
        llm.close()


@pytest.mark.parametrize("kind", NAMES)
def test_llamacpp_tokenizes_the_export_like_transformers(kind, tmp_path, one_thread, monkeypatch):
    """Every text gets the same ids from llama.cpp (GGUF) as from transformers (folder); under any other name,
    ``default`` (the name written before) included, some text does not. Skipped without llama_cpp."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from transformers import AutoTokenizer

    from daprune.export import tokenizer as tokenizer_module
    from daprune.export.gguf_writer import export_gguf

    folder = folder_with(trained(kind), tmp_path / kind)
    hf = AutoTokenizer.from_pretrained(folder)
    expected = [hf.encode(t, add_special_tokens=False) for t in TEXTS]
    export_gguf(folder, tmp_path / "m.gguf")
    assert _llamacpp_ids(llama_cpp, tmp_path / "m.gguf") == expected
    for other in [n for n in NAMES if n != kind] + ["default"]:
        monkeypatch.setattr(tokenizer_module, "pre_tokenizer_name", lambda tj, name=other: name)
        export_gguf(folder, tmp_path / f"{other}.gguf")
        assert _llamacpp_ids(llama_cpp, tmp_path / f"{other}.gguf") != expected, other


@pytest.mark.parametrize("pre_tokenizer, why", [
    # a split after the byte mapping sees 'Ġ' for a space: not what llama.cpp (splitting the text itself) does
    ({"type": "Sequence", "pretokenizers": [{"type": "ByteLevel", "add_prefix_space": False, "use_regex": False},
                                            {"type": "Split", "pattern": {"Regex": QWEN2}, "behavior": "Isolated",
                                             "invert": False}]}, "splits after its ByteLevel step"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": None, "behavior": "Isolated"},
                                            {"type": "ByteLevel", "use_regex": False}]}, "not an isolating regex"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Split", "pattern": {"String": " "}, "behavior": "Isolated"},
                                            {"type": "ByteLevel", "use_regex": False}]}, "not an isolating regex"),
    (None, "no ByteLevel step"),
])
def test_malformed_or_reordered_pre_tokenizers_are_refused_in_one_line(pre_tokenizer, why):
    with pytest.raises(ExportError, match=why):
        pre_tokenizer_name({"model": {"type": "BPE"}, "pre_tokenizer": pre_tokenizer})


def test_unreadable_tokenizer_json_is_an_export_error(tmp_path, one_thread):
    from daprune.export.gguf_writer import export_gguf

    folder = folder_with(trained("gpt-2"), tmp_path / "m")
    (folder / "tokenizer.json").write_text("{not json")
    with pytest.raises(ExportError, match="cannot read .*tokenizer.json"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


def test_source_gguf_followed_through_pruned_folders(tmp_path):
    """A folder pruned from a folder that was pruned from a GGUF: the tokenizer comes from that GGUF, as for the
    first prune (its report.json names the GGUF), so a second prune exports the same tokenizer keys."""
    from daprune.export.tokenizer import source_gguf

    gguf_file = tmp_path / "base.gguf"
    gguf_file.write_bytes(b"GGUF")
    first, second = tmp_path / "first", tmp_path / "second"
    for folder, model in ((first, gguf_file), (second, first)):
        folder.mkdir()
        (folder / "report.json").write_text(json.dumps({"settings": {"model": str(model)}}))
    assert source_gguf(first) == gguf_file and source_gguf(second) == gguf_file
    (second / "report.json").write_text(json.dumps({"settings": {"model": str(second)}}))  # a report naming itself
    assert source_gguf(second) is None
