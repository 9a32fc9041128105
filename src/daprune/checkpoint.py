"""The work folder that makes a pruning run resumable after any interruption, even ``kill -9``.

Pruning a large model takes hours; losing them to a crash, an out-of-memory kill or a pre-empted job is
what this module prevents. Beside the output (``OUT.daprune-work/`` unless ``--work-dir`` says
otherwise) the run keeps, after every finished block:

* ``blocks/layer-NNNNN.safetensors``: that block's pruned tensors (in streaming mode these very files
  become the output shards, hard-linked into the atomic output folder at the end);
* ``streams-NNNNN.safetensors`` (or, with ``--activations disk``, the memory-mapped ``act/*.bin`` files):
  the pruned and dense activation streams entering the next block;
* ``gradients/layer-NNNNN.safetensors`` (Taylor criteria: each block's weight gradients) and
  ``fisher/all.safetensors`` (``--error-weight fisher|kfac``): the pre-passes computed once on the dense model
  before the first block, committed by name in ``state.json`` (``prepasses``) once all their files are written;
* ``records/layer-NNNNN.json``: that block's BlockRecord (what report.json's ``layers`` shows), one file per
  block so that a commit writes only the new block's record (a state file holding every record so far would make
  the checkpoint writes of a run quadratic in its depth);
* ``state.json``: the commit record. It names the last finished block, the streams files, the adaptive plans, the
  finished pre-passes, and the run's *identity*: every setting, a
  fingerprint of the model source and a digest of the calibration token ids (so pre-pass files are reused only
  by the run they were computed for: another identity is refused or, with ``--no-resume``, the folder deleted).

Every file is written to a temporary name, fsynced and ``os.replace``-d into place (:mod:`daprune.atomic`),
and ``state.json`` is written last, so a kill at any instant leaves either the previous commit or the new
one, never a half-written one. A rerun with the same identity continues after the last committed block; with a
different identity it refuses (``ResumeError``, naming what differs) unless ``--no-resume`` discards
the folder. Per-block RNG seeds come from (seed, block index), so a resumed run draws exactly what the
uninterrupted one would have, and its output files are byte-identical.

Test hook (test-only, never set it in production): ``DAPRUNE_TEST_KILL_AFTER_BLOCK=K`` sends SIGKILL to
the process right after block K's checkpoint is committed; ``K:before-state`` kills after the block and
streams files are written but before ``state.json`` names them (a kill in the middle of a checkpoint);
``NAME`` (``gradients``, ``fisher``) kills right after that pre-pass is committed, before the first block.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import signal
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from daprune.atomic import atomic_save_tensors, atomic_write_bytes, atomic_write_json, fsync_file, pid_alive
from daprune.errors import ResumeError

log = logging.getLogger(__name__)

WORK_SUFFIX = ".daprune-work"
STATE_FILE = "state.json"
FORMAT = 1
KILL_ENV = "DAPRUNE_TEST_KILL_AFTER_BLOCK"  # test-only hook, see the module docstring


def default_work_dir(out: str | os.PathLike) -> Path:
    """``OUT.daprune-work`` beside the output: same filesystem, so shards can be hard-linked into place."""
    out = Path(out).expanduser()
    return out.with_name(out.name + WORK_SUFFIX)


# -- identity of a run --------------------------------------------------------------------------------------
def source_fingerprint(source: dict | None) -> dict:
    """What identifies the model weights without reading them: config text and each weight file's size/mtime.

    Hashing tens of GB of weights would cost minutes on every start; size + mtime (ns) change whenever a
    file is rewritten, which is what matters for "same model as the interrupted run".
    """
    if source is None:
        return {}
    fp: dict[str, Any] = {"kind": source.get("kind"), "origin": source.get("origin")}
    path = Path(source.get("path", ""))
    if path.is_dir():
        cfg = path / "config.json"
        fp["config_sha256"] = hashlib.sha256(cfg.read_bytes()).hexdigest() if cfg.is_file() else None
        fp["weights"] = [[f.name, f.stat().st_size, f.stat().st_mtime_ns] for f in sorted(path.iterdir())
                         if f.suffix in (".safetensors", ".bin") or f.name.endswith(".index.json")]
    return fp


def ids_digest(ids: torch.Tensor) -> str:
    """SHA-256 of token ids as contiguous int64 bytes: what identifies calibration rows (work folders, reports)."""
    return hashlib.sha256(ids.detach().to("cpu", torch.int64).contiguous().numpy().tobytes()).hexdigest()


def _normalise(obj: Any) -> Any:
    """JSON round trip, so tuples/lists and int/float keys compare like they will after reading back."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def _diff(old: dict, new: dict, prefix: str = "") -> list[str]:
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{key}.")
        elif a != b:
            out.append(f"{prefix}{key}: {_short(a)} -> {_short(b)}")
    return out


def _with_new_defaults(old: dict, new: dict) -> dict:
    """``old`` (a stored identity) with the settings a later daprune added filled in where this run leaves them at
    their defaults: a run interrupted before a setting existed ran without it, which is what its default does (new
    settings are only ever added with defaults that keep the earlier behaviour). Anything else still differs."""
    from daprune.config import PruneConfig

    if not isinstance(old.get("settings"), dict):
        return old
    defaults = _normalise(PruneConfig().to_dict())
    settings = dict(old["settings"])
    for key, value in new.get("settings", {}).items():
        if key not in settings and key in defaults and value == defaults[key]:
            settings[key] = value
    return {**old, "settings": settings}


def _short(v: Any) -> str:
    s = json.dumps(v, default=str)
    return s if len(s) <= 60 else s[:57] + "..."


# -- the work folder ----------------------------------------------------------------------------------------
@dataclass
class Restored:
    """What a resumed run continues from."""

    next_block: int
    records: list[dict]
    xp: torch.Tensor
    xd: torch.Tensor | None
    plans: dict[int, dict] | None
    extra: dict


class WorkDir:
    """One run's resumable state; see the module docstring for the layout and the commit protocol."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.state: dict | None = None
        self.resumed_from: int | None = None
        self._lock: Path | None = None

    # paths
    @property
    def blocks(self) -> Path:
        return self.path / "blocks"

    @property
    def act(self) -> Path:
        return self.path / "act"

    def block_file(self, i: int) -> Path:
        return self.blocks / f"layer-{i:05d}.safetensors"

    # pre-passes: what is computed once on the dense model before the first block (Taylor gradients, fisher
    # weights), kept so that a resumed run does not pay for the pass again
    def prepass_file(self, name: str, block: int | None = None) -> Path:
        """``NAME/layer-NNNNN.safetensors`` for one block's part of pre-pass ``name``, ``NAME/all.safetensors``
        for a pre-pass kept in one file (the folder is created)."""
        folder = self.path / name
        folder.mkdir(exist_ok=True)
        return folder / (f"layer-{block:05d}.safetensors" if block is not None else "all.safetensors")

    def prepass_done(self, name: str) -> bool:
        """Whether pre-pass ``name`` of this very run (same identity and calibration ids) is complete on disk."""
        return self.state is not None and name in self.state.get("prepasses", [])

    def mark_prepass(self, name: str) -> None:
        """Commit pre-pass ``name``: its files are all written (each atomically), so a resumed run reads them."""
        assert self.state is not None
        self.state["prepasses"] = sorted({*self.state.get("prepasses", []), name})
        atomic_write_json(self.path / STATE_FILE, self.state)
        _test_kill(name, "")

    def _read_state(self) -> dict | None:
        f = self.path / STATE_FILE
        if not f.is_file():
            return None
        try:
            state = json.loads(f.read_text())
        except (OSError, ValueError) as exc:
            raise ResumeError(f"the work folder {self.path} has an unreadable {STATE_FILE} ({exc}); "
                              "pass --no-resume to start over") from exc
        if state.get("format") != FORMAT:
            raise ResumeError(f"the work folder {self.path} was written by another daprune version "
                              f"(format {state.get('format')}); pass --no-resume to start over")
        return state

    def open(self, identity: dict, resume: bool = True) -> None:
        """Create the folder, or check that an existing one belongs to this exact run.

        ``identity`` holds the settings and the source fingerprint (not yet the calibration ids: those are
        checked by :meth:`set_ids` once computed). Refuses, naming every difference, when they differ.
        """
        identity = _normalise(identity)
        state = self._read_state() if self.path.exists() else None
        if self.path.exists() and not resume:
            log.info("--no-resume: discarding the work folder %s", self.path)
            self.remove()
            state = None
        elif state is not None and (stored := _with_new_defaults(state.get("identity", {}), identity)) != identity:
            diff = _diff(stored, identity)
            raise ResumeError(
                f"the work folder {self.path} holds an interrupted run with different settings or inputs "
                f"({'; '.join(diff[:6]) or 'unknown difference'}); rerun with the original arguments to resume, "
                "or pass --no-resume to discard it and start over"
            )
        self.path.mkdir(parents=True, exist_ok=True)
        self._take_lock()
        self.blocks.mkdir(exist_ok=True)
        if state is None:
            state = {"format": FORMAT, "identity": identity, "next_block": 0, "ids_sha256": None}
            atomic_write_json(self.path / STATE_FILE, state)
        self.state = state

    def _take_lock(self) -> None:
        """Refuse a second live process on the same work folder (a killed one leaves a stale lock: taken over)."""
        lock = self.path / "lock"
        try:
            pid = int(lock.read_text().strip())
        except (OSError, ValueError):
            pid = None
        if pid is not None and pid != os.getpid() and pid_alive(pid):
            raise ResumeError(f"another daprune process (pid {pid}) is using the work folder {self.path}")
        atomic_write_bytes(lock, str(os.getpid()).encode())
        self._lock = lock

    # calibration ids
    def cached_ids(self) -> torch.Tensor | None:
        """The interrupted run's calibration ids (reused for self-generated data, which is slow to redo)."""
        f = self.path / "ids.safetensors"
        if self.state is None or not self.state.get("ids_sha256") or not f.is_file():
            return None
        from safetensors.torch import load_file

        ids = load_file(str(f))["ids"]
        return ids if ids_digest(ids) == self.state["ids_sha256"] else None

    def set_ids(self, ids: torch.Tensor) -> None:
        """Record the calibration ids; refuse when a resumed run's ids differ (e.g. the text file changed)."""
        assert self.state is not None
        digest = ids_digest(ids)
        old = self.state.get("ids_sha256")
        if old is not None and old != digest:
            raise ResumeError(
                f"the calibration tokens differ from those of the interrupted run in {self.path} (was the "
                "calibration text or tokenizer changed?); pass --no-resume to start over"
            )
        if old is None:
            atomic_save_tensors(self.path / "ids.safetensors", {"ids": ids.to(torch.int64)})
            self.state["ids_sha256"] = digest
            atomic_write_json(self.path / STATE_FILE, self.state)

    # blocks
    def restore(self, n_layers: int) -> Restored | None:
        """The last commit, or None when no block has finished yet."""
        st = self.state
        if st is None or not st.get("next_block"):
            return None
        k = int(st["next_block"])
        missing = [i for i in range(min(k, n_layers)) if not self.block_file(i).is_file()]
        if missing:
            raise ResumeError(f"the work folder {self.path} lacks the checkpoint of block(s) {missing[:5]}; "
                              "pass --no-resume to start over")
        try:
            xp, xd = self._load_streams(st["streams"])
        except Exception as exc:  # a missing or damaged streams file: the commit cannot be used
            raise ResumeError(f"the work folder {self.path} has unreadable activation streams ({exc}); "
                              "pass --no-resume to start over") from exc
        records = st["records"] if "records" in st else self._read_records(k)  # the former: an older daprune's folder
        plans = st.get("plans")
        self.resumed_from = k
        log.warning("resuming from %s: blocks 0..%d are done", self.path, k - 1)
        return Restored(k, records, xp, xd, {int(i): p for i, p in plans.items()} if plans else None,
                        st.get("extra", {}))

    def record_file(self, i: int) -> Path:
        return self.path / "records" / f"layer-{i:05d}.json"

    def _read_records(self, k: int) -> list[dict]:
        try:
            return [json.loads(self.record_file(i).read_text()) for i in range(k)]
        except (OSError, ValueError) as exc:
            raise ResumeError(f"the work folder {self.path} has a missing or unreadable block record ({exc}); "
                              "pass --no-resume to start over") from exc

    def _load_streams(self, spec: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        if spec["format"] == "safetensors":
            from safetensors.torch import load_file

            t = load_file(str(self.path / spec["file"]))
            return t["xp"], t.get("xd")
        out = []
        for key in ("xp", "xd"):
            s = spec.get(key)
            if s is None:
                out.append(None)
                continue
            dtype = getattr(torch, s["dtype"])
            n = 1
            for d in s["shape"]:
                n *= d
            t = torch.from_file(str(self.path / s["file"]), shared=False, size=n, dtype=dtype).view(s["shape"])
            out.append(t)
        return out[0], out[1]

    def commit(self, i: int, records: list, xp: torch.Tensor, xd: torch.Tensor | None, plans: dict | None,
               acts_files: dict[str, str | None] | None = None, extra: dict | None = None) -> None:
        """Block ``i`` is finished (its tensors already in :meth:`block_file`): save streams and its record (the last
        of ``records``, one per block so far), then state.

        ``acts_files`` (disk activations) names the memory-mapped files that already hold xp/xd; they are
        fsynced instead of copied.
        """
        assert self.state is not None
        if acts_files is not None:
            spec: dict[str, Any] = {"format": "bin"}
            for key, t in (("xp", xp), ("xd", xd)):
                name = acts_files.get(key)
                if t is None:
                    spec[key] = None
                    continue
                fsync_file(self.path / name)
                spec[key] = {"file": name, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        else:
            name = f"streams-{i:05d}.safetensors"
            tensors = {"xp": xp} if xd is None else {"xp": xp, "xd": xd}
            atomic_save_tensors(self.path / name, tensors)
            spec = {"format": "safetensors", "file": name}
        # block i's record (the ones before it are on disk already: each commit adds one)
        assert len(records) == i + 1, "one record per block, blocks 0..i"
        rec = records[-1]
        self.record_file(i).parent.mkdir(exist_ok=True)
        atomic_write_json(self.record_file(i), dataclasses.asdict(rec) if dataclasses.is_dataclass(rec) else rec)
        _test_kill(i, "before-state")
        old = self.state.get("streams")
        self.state.pop("records", None)
        self.state.update({
            "next_block": i + 1,
            "streams": spec,
            "plans": {str(k): dataclasses.asdict(p) for k, p in plans.items()} if plans else None,
            "extra": extra or {},
        })
        atomic_write_json(self.path / STATE_FILE, self.state)
        if old is not None and old.get("format") == "safetensors" and old["file"] != spec.get("file"):
            (self.path / old["file"]).unlink(missing_ok=True)
        _test_kill(i, "")

    def remove(self) -> None:
        """Delete the folder (after success, on a deterministic input error, or for --no-resume)."""
        shutil.rmtree(self.path, ignore_errors=True)
        self.state = None


# -- per-block tensors (pre-pass results) ---------------------------------------------------------------------
def save_block_tensors(path: Path, tensors: Mapping[int, dict[str, torch.Tensor]]) -> None:
    """Write per-block tensors by role (``{block: {role: tensor}}``) to one safetensors file, atomically (keys
    ``BLOCK.ROLE``)."""
    atomic_save_tensors(path, {f"{i}.{role}": t for i, roles in tensors.items() for role, t in roles.items()})


def load_block_tensors(path: Path) -> dict[int, dict[str, torch.Tensor]]:
    """What :func:`save_block_tensors` wrote; a missing or damaged file is a ``ResumeError`` (the commit that
    named it cannot be used)."""
    from safetensors.torch import load_file

    try:
        flat = load_file(str(path))
    except Exception as exc:
        raise ResumeError(f"cannot read {path} of the interrupted run ({exc}); pass --no-resume to start "
                          "over") from exc
    out: dict[int, dict[str, torch.Tensor]] = {}
    for key, t in flat.items():
        i, _, role = key.partition(".")
        out.setdefault(int(i), {})[role] = t
    return out


class BlockFiles(Mapping[int, dict[str, torch.Tensor]]):
    """Per-block tensors kept one file per block, read when a block is looked up: a consumer that visits the
    blocks one at a time (the pipeline reads ``grads.get(i)``) holds one block's tensors, not every block's."""

    def __init__(self, file: Callable[[int], Path], blocks: range):
        self._file = file
        self._blocks = blocks

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if i not in self._blocks:
            raise KeyError(i)
        return load_block_tensors(self._file(i)).get(i, {})

    def __iter__(self) -> Iterator[int]:
        return iter(self._blocks)

    def __len__(self) -> int:
        return len(self._blocks)


def _test_kill(block: int | str, phase: str) -> None:
    """Test-only: SIGKILL this process at a chosen point of block ``block``'s checkpoint, or right after pre-pass
    ``block`` (a name) is committed (see module doc)."""
    spec = os.environ.get(KILL_ENV)
    if not spec:
        return
    want_block, _, want_phase = spec.partition(":")
    if want_block.strip() == str(block) and want_phase == phase:
        log.warning("%s=%s: killing the process (test hook)", KILL_ENV, spec)
        os.kill(os.getpid(), signal.SIGKILL)
