"""Crash-safe writing: files that hold either their old content or all of the new, never a prefix.

Why: a run can be killed at any instant (``kill -9``, out of memory, a pre-empted job), and both the
work folder (:mod:`daprune.checkpoint`) and the output folder (:mod:`daprune.output`) must then still be
usable or recognisably left over. Every file goes to a temporary name, is fsynced and ``os.replace``-d
into place; temp folders carry their owner (:func:`owner_tag`), so that what a killed process left
behind is removed by the next run (:func:`remove_stale_siblings`) and a live one's never is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # torch only for the hint: the CLI's parsers import this module before any model work
    import torch

log = logging.getLogger(__name__)


def fsync_dir(path: Path) -> None:
    """Make a rename inside ``path`` durable (a no-op where directories cannot be opened)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())


def usual_mode(path: str | os.PathLike, *, folder: bool = False, umask: int | None = None) -> None:
    """Give a ``mkstemp`` / ``mkdtemp`` entry the mode a plain ``open`` / ``mkdir`` would (0666 / 0777 less the
    umask). Those make owner-only entries (0600 / 0700), right for scratch files but not for outputs renamed into
    place: a pruned folder served from another account (vLLM or ollama in a container, a shared cluster folder)
    could not be read. ``umask``: the process's, when the caller has read it already."""
    want = (0o777 if folder else 0o666) & ~(_umask() if umask is None else umask)
    try:
        if os.stat(path).st_mode & 0o777 != want:
            os.chmod(path, want)
    except OSError as exc:  # FAT/exFAT, some CIFS/FUSE mounts fix modes: the write must not fail over them
        log.debug("cannot set the mode of %s: %s", path, exc)


def _umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status): setting it to read it
    would, for that instant, let another thread (the request cache's sqlite writer) create world-writable files."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # elsewhere the only way is to set it and put it back; the most private value meanwhile
    os.umask(mask)
    return mask


def usual_modes(tree: str | os.PathLike) -> None:
    """:func:`usual_mode` on a folder and everything in it: safetensors' ``save_file`` (so ``save_pretrained``)
    writes its files owner-only too, so an output folder is set right as a whole before it is renamed into place."""
    mask = _umask()  # once for the tree
    usual_mode(tree, folder=True, umask=mask)
    for root, dirs, files in os.walk(tree):  # links are left alone: chmod would change what they point to
        for names, folder in ((dirs, True), (files, False)):
            for name in names:
                if not os.path.islink(p := os.path.join(root, name)):
                    usual_mode(p, folder=folder, umask=mask)


def _tmp_name(path: Path) -> Path:
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    os.close(fd)
    usual_mode(name)
    return Path(name)


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` so that ``path`` holds either its old content or all of ``data``, never a prefix."""
    path = Path(path)
    tmp = _tmp_name(path)
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int = 1, sort_keys: bool = True,
                      default=None) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=indent, sort_keys=sort_keys, default=default) + "\n").encode())


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors ``save_file`` through a temp name + fsync + rename (tensors are made contiguous on CPU)."""
    from safetensors.torch import save_file

    tmp = _tmp_name(path)
    try:
        save_file({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata=metadata or {"format": "pt"})
        fsync_file(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a zombie or a reused pid still counts as alive: refusing is the safe side; the message names the pid
    return Path(f"/proc/{pid}").exists() if Path("/proc").is_dir() else True


def owner_tag() -> str:
    """``PID-HOST`` for temp names: which process owns a temp folder (HOST: 8 hex digits of the host name).

    The host part keeps a process on another machine (an output folder on a shared filesystem) from
    judging a folder by a pid that means nothing on this one.
    """
    import socket

    return f"{os.getpid()}-{hashlib.sha256(socket.gethostname().encode()).hexdigest()[:8]}"


def remove_stale_siblings(out: Path) -> list[Path]:
    """Delete ``.OUT.tmp-PID-HOST-*`` / ``.OUT.old-PID-HOST`` left beside ``out`` by a killed process.

    ``output.atomic_dir`` names its temp folder (and, on --overwrite, the replaced output) this way; a
    ``kill -9`` while the output is assembled leaves them behind. Only folders whose owner is a dead
    process on this host are removed: this process's, a live one's, another host's, and names without
    an owner (older versions) are kept. Returns what was removed.
    """
    import re

    pid_s, host = owner_tag().split("-")
    pattern = re.compile(rf"\.{re.escape(out.name)}\.(?:tmp|old)-(\d+)-([0-9a-f]{{8}})(?:-.*)?")
    removed = []
    try:
        siblings = list(out.parent.iterdir())
    except OSError:
        return removed
    for p in siblings:
        m = pattern.fullmatch(p.name)
        if m is None or m[2] != host or not p.is_dir() or p.is_symlink():
            continue
        if int(m[1]) == int(pid_s) or pid_alive(int(m[1])):
            continue
        log.warning("removing %s, left by a killed daprune process (pid %s)", p, m[1])
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


@contextmanager
def exclusive_lock(path: Path) -> Iterator[None]:
    """Hold an exclusive advisory lock on the file ``path`` (created if missing) for the ``with`` block, so that
    processes sharing a cache do the same expensive work once: the second waits, then finds it done. Where the
    lock cannot be had (no ``fcntl`` on Windows, a filesystem without flock, a lock file this account cannot
    open) the block runs unlocked, as before there was a lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = None
    try:
        fh = open(path, "a")  # noqa: SIM115 - held across the yield
        fcntl.flock(fh, fcntl.LOCK_EX)
    except OSError as exc:  # a filesystem without flock (some FUSE / Lustre mounts), another account's lock file
        log.warning("running without the lock %s (%s)", path, exc)
        if fh is not None:
            fh.close()
        fh = None
    try:
        yield
    finally:
        if fh is not None:
            fh.close()  # closing releases the lock
