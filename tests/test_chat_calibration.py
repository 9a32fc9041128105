"""Conversations the model writes for itself (``--calibration chat``, data/chat.py): rows laid out as the chat
template writes a conversation, continued as each row would be alone, read back from the cache, refused without a
template, recorded in report.json."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_streaming import word_tokenizer

from daprune.checkpoint import ids_digest
from daprune.data.chat import chat_frame, continue_rows, describe, self_chat
from daprune.errors import CalibrationError

pytestmark = pytest.mark.usefixtures("one_thread")

# words w3..w127, <s> = 1, </s> = 2: a default system turn, then one turn per message, then the answer's header
TEMPLATE = ("{{ '<s> w4 w5 </s> ' }}{% for m in messages %}{{ '<s> w6 ' + m['content'] + ' </s> ' }}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<s> w7 ' }}{% endif %}")
OPENING, TURN = [1, 4, 5, 2, 1, 6], [2, 1, 7]


def chat_tokenizer(vocab: int = 128):
    tok = word_tokenizer(vocab)
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


def test_frame_is_the_templates_tokens_around_the_message():
    assert chat_frame(chat_tokenizer()) == (OPENING, TURN)


def test_a_tokenizer_without_a_template_is_refused():
    with pytest.raises(CalibrationError, match="chat template"):
        chat_frame(word_tokenizer(128))


def test_rows_are_opening_request_turn_answer(model):
    """Every row: the opening, a request of at most the budget with no end-of-turn token in it, the turn change,
    then the answer to the row's end with no end-of-turn token either (it is suppressed)."""
    seqlen = 30
    budget = (seqlen - len(OPENING) - len(TURN)) // 2
    ids = self_chat(model, chat_tokenizer(), 6, seqlen, 0, temperature=1.0, top_p=1.0, batch_size=4,
                    progress=False)
    assert ids.shape == (6, seqlen)
    lengths = []
    for row in ids.tolist():
        assert row[:len(OPENING)] == OPENING
        rest = row[len(OPENING):]
        at = next(i for i in range(len(rest)) if rest[i:i + len(TURN)] == TURN)
        assert at <= budget and 2 not in rest[:at]
        assert 2 not in rest[at + len(TURN):]
        lengths.append(at)
    info = describe(ids, chat_tokenizer())
    assert info["request_tokens"]["min"] == min(lengths) and info["request_tokens"]["max"] == max(lengths)
    assert info["template_tokens"] == {"opening": len(OPENING), "turn": len(TURN)}
    again = self_chat(model, chat_tokenizer(), 6, seqlen, 0, temperature=1.0, top_p=1.0, batch_size=4,
                      progress=False)
    other = self_chat(model, chat_tokenizer(), 6, seqlen, 1, temperature=1.0, top_p=1.0, batch_size=4,
                      progress=False)
    assert torch.equal(ids, again) and not torch.equal(ids, other)


def test_describe_reads_request_lengths_off_hand_made_rows():
    rows = torch.tensor([OPENING + [9, 10, 11] + TURN + [20] * 8,
                         OPENING + [12] + TURN + [21] * 10,
                         OPENING + TURN + [22] * 11])
    info = describe(rows, chat_tokenizer())
    assert info["request_tokens"] == {"min": 0, "mean": 1.3, "max": 3, "at_budget": 0}
    with pytest.raises(CalibrationError, match="no turn change"):
        describe(torch.tensor([OPENING + [9] * 14]), chat_tokenizer())


def test_prompts_of_different_lengths_continue_as_each_would_alone(model):
    """Greedy continuation in one left-padded batch equals a plain argmax loop on each prompt by itself, with the
    end tokens' logits removed (they are suppressed until the row is full)."""
    prompts = [OPENING + [9, 10, 11, 12, 13] + TURN, OPENING + TURN, OPENING + [40, 41] + TURN]
    seqlen, ends = 24, [2]
    got = continue_rows(model, prompts, seqlen, ends, 0, {"do_sample": True, "top_p": 1e-9, "top_k": 0})
    for p, row in zip(prompts, got, strict=True):
        ids = torch.tensor([p])
        with torch.no_grad():
            while ids.shape[1] < seqlen:
                logits = model(ids).logits[0, -1].clone()
                logits[ends] = -torch.inf
                ids = torch.cat([ids, logits.argmax().view(1, 1)], 1)
        assert row == ids[0].tolist()


def test_row_budget_too_small_is_refused(model):
    with pytest.raises(CalibrationError, match="too short for chat rows"):
        self_chat(model, chat_tokenizer(), 2, len(OPENING) + len(TURN) + 7, 0, temperature=1.0, top_p=1.0,
                  progress=False)


def _save(model, folder: Path, template: bool) -> Path:
    model.save_pretrained(folder)
    (chat_tokenizer() if template else word_tokenizer(128)).save_pretrained(folder)
    return folder


CHAT = dict(calibration="chat", nsamples=4, seqlen=24, layers="1:-1", sparsity=0.2, progress=False)


def test_prune_on_chat_rows_reports_and_caches_them(tmp_path, monkeypatch):
    """A prune reads exactly the rows self_chat writes (same digest), reports how they were made, keeps them in the
    cache under a key of their own (self-generated text with the same settings is generated anew), and a second
    run reads them back without generating."""
    from daprune.api import prune

    src = _save(tiny_model(layers=3), tmp_path / "src", template=True)
    cache = tmp_path / "cache"
    first = prune(model=str(src), out=str(tmp_path / "a"), cache=str(cache), **CHAT)
    cal = first.report["calibration"]
    assert cal["kind"] == "self-generated conversations" and "reused_from_cache" not in cal
    assert cal["sampling"]["template_tokens"] == {"opening": len(OPENING), "turn": len(TURN)}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    expect = self_chat(AutoModelForCausalLM.from_pretrained(src).eval(), AutoTokenizer.from_pretrained(src), 4, 24,
                       CHAT.get("seed", 0), temperature=1.0, top_p=1.0, progress=False)
    assert cal["ids_sha256"] == ids_digest(expect)

    def fail(*_a, **_k):
        raise AssertionError("generated again although the rows are in the cache")

    monkeypatch.setattr("daprune.data.chat.self_chat", fail)
    second = prune(model=str(src), out=str(tmp_path / "b"), cache=str(cache), **CHAT)
    assert "reused_from_cache" in second.report["calibration"]
    assert second.report["calibration"]["ids_sha256"] == cal["ids_sha256"]
    third = prune(model=str(src), out=str(tmp_path / "c"), cache=str(cache), **{**CHAT, "calibration": "self"})
    assert "reused_from_cache" not in third.report["calibration"]
    assert third.report["calibration"]["ids_sha256"] != cal["ids_sha256"]
    assert json.loads((tmp_path / "a" / "report.json").read_text())["calibration"]["kind"] == cal["kind"]


def test_prune_without_a_template_is_refused_before_generating(tmp_path, monkeypatch):
    from daprune.api import prune

    src = _save(tiny_model(layers=3), tmp_path / "src", template=False)

    def fail(*_a, **_k):
        raise AssertionError("generation started")

    monkeypatch.setattr("daprune.data.chat.self_chat", fail)
    with pytest.raises(CalibrationError, match="chat template"):
        prune(model=str(src), out=str(tmp_path / "out"), **{**CHAT, "calibration": "lambada+chat"})
    assert not (tmp_path / "out").exists()


def test_an_interrupted_chat_prune_resumes_on_its_rows(tmp_path, monkeypatch):
    """The conversations are kept in the work folder: a run stopped after block 2 resumes without generating and
    writes the model an uninterrupted run writes (the rows come from the work folder, not the generated cache)."""
    from test_resume import _resume_without_recomputing

    import daprune.data.chat as chat

    src = _save(tiny_model(layers=5), tmp_path / "src", template=True)
    args = ["--model", str(src), "--calibration", "chat", "--nsamples", "4", "--seqlen", "24", "--layers", "1:-1",
            "--sparsity", "0.2", "--cache-dir", str(tmp_path / "cache"), "--quiet"]
    _, out = _resume_without_recomputing(tmp_path, monkeypatch, args, chat, "self_chat", "generated again")
    report = json.loads((out / "report.json").read_text())["calibration"]
    assert report["kind"] == "self-generated conversations" and report["reused_from_work_folder"] is True
