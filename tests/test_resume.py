"""Resume: a run killed at any point and started again produces byte-identical output files."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_streaming import save_model

from daprune.checkpoint import KILL_ENV
from daprune.cli import main
from daprune.errors import ResumeError

ARGS = ["--calibration", "random", "--nsamples", "8", "--seqlen", "24", "--layers", "1:-1", "--sparsity", "0.2",
        "--ffn-criterion", "random", "--quiet"]
SKIP = {"report.json", "layers.png"}  # timings and the resume note differ; every weight/config file must not


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def src(tmp_path_factory) -> Path:
    return save_model(tiny_model(layers=6), tmp_path_factory.mktemp("resume") / "src", tokenizer=False)


@pytest.fixture(scope="module")
def reference(src, tmp_path_factory) -> dict[str, str]:
    """File hashes of an uninterrupted run."""
    out = tmp_path_factory.mktemp("ref") / "out"
    assert main(["prune", "--model", str(src), "--out", str(out), *ARGS]) == 0
    return _hashes(out)


def _hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.name not in SKIP}


def _work(out: Path) -> Path:
    return out.with_name(out.name + ".daprune-work")


class Crash(BaseException):
    """Stands in for a kill: not an Exception, so nothing catches it and the work folder is kept."""


def _crash_at(monkeypatch, block: int | str, phase: str = "") -> None:
    import daprune.checkpoint as ck

    def hook(b: int | str, p: str) -> None:
        if b == block and p == phase:
            raise Crash(f"block {b} {p}")

    monkeypatch.setattr(ck, "_test_kill", hook)


def test_kill9_after_block_then_resume(src, reference, tmp_path):
    """The real thing: SIGKILL in a subprocess right after block 2's checkpoint, then the same command."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "daprune.cli", "prune", "--model", str(src), "--out", str(out), *ARGS]
    env = {**os.environ, KILL_ENV: "2", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert not out.exists()
    state = json.loads((_work(out) / "state.json").read_text())
    assert state["next_block"] == 3 and "records" not in state
    assert sorted(f.name for f in (_work(out) / "records").iterdir()) == [f"layer-{i:05d}.json" for i in range(3)]
    assert main(["prune", "--model", str(src), "--out", str(out), *ARGS]) == 0
    assert _hashes(out) == reference
    report = json.loads((out / "report.json").read_text())
    assert report["execution"]["resumed_from_block"] == 3
    assert not _work(out).exists()


@pytest.mark.parametrize("block,phase,first,second", [
    (3, "before-state", "device", "device"),  # killed in the middle of a checkpoint: block 3 is redone
    (1, "", "disk", "disk"),  # memory-mapped streams are the checkpoint
    (2, "", "disk", "cpu"),  # activation storage may change between attempts
])
def test_crash_anywhere_then_resume(src, reference, tmp_path, monkeypatch, block, phase, first, second):
    out = tmp_path / "out"
    _crash_at(monkeypatch, block, phase)
    with pytest.raises(Crash):
        main(["prune", "--model", str(src), "--out", str(out), "--activations", first, *ARGS])
    assert not out.exists() and _work(out).is_dir()
    state = json.loads((_work(out) / "state.json").read_text())
    assert state["next_block"] == (block if phase else block + 1)
    monkeypatch.undo()
    assert main(["prune", "--model", str(src), "--out", str(out), "--activations", second, *ARGS]) == 0
    assert _hashes(out) == reference
    assert not _work(out).exists()


def test_crash_while_writing_output_then_resume(src, reference, tmp_path, monkeypatch):
    """All blocks done, killed while assembling the folder: the rerun only assembles it."""
    import daprune.output as output

    out = tmp_path / "out"

    def boom(_tmp):
        raise Crash("assembling")

    monkeypatch.setattr(output, "write_remote_code", boom)
    with pytest.raises(Crash):
        main(["prune", "--model", str(src), "--out", str(out), *ARGS])
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.tmp")]
    monkeypatch.undo()
    assert main(["prune", "--model", str(src), "--out", str(out), *ARGS]) == 0
    assert _hashes(out) == reference
    assert json.loads((out / "report.json").read_text())["execution"]["resumed_from_block"] == 6


def test_different_arguments_refuse_to_resume(src, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    _crash_at(monkeypatch, 2)
    with pytest.raises(Crash):
        main(["prune", "--model", str(src), "--out", str(out), *ARGS])
    monkeypatch.undo()
    changed = [a if a != "0.2" else "0.25" for a in ARGS]
    capsys.readouterr()
    assert main(["prune", "--model", str(src), "--out", str(out), *changed]) == 2
    err = capsys.readouterr().err
    assert "different settings" in err and "sparsity: 0.2 -> 0.25" in err and "--no-resume" in err
    assert "Traceback" not in err
    assert _work(out).is_dir() and not out.exists()  # the interrupted run's folder is left alone
    assert main(["prune", "--model", str(src), "--out", str(out), *changed, "--no-resume"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["execution"]["resumed_from_block"] is None and report["settings"]["sparsity"] == 0.25


def test_a_setting_added_since_the_interruption_resumes_at_its_default(src, reference, tmp_path, monkeypatch):
    """A work folder written before a setting existed resumes when this run leaves that setting at its default (what
    the older run did), and is refused, naming it, when this run sets it."""
    out = tmp_path / "out"
    _crash_at(monkeypatch, 2)
    with pytest.raises(Crash):
        main(["prune", "--model", str(src), "--out", str(out), *ARGS])
    monkeypatch.undo()
    state_file = _work(out) / "state.json"
    state = json.loads(state_file.read_text())
    assert state["identity"]["settings"].pop("seed") == 0  # as an older daprune, without --seed, wrote it
    state_file.write_text(json.dumps(state))
    assert main(["prune", "--model", str(src), "--out", str(out), *ARGS, "--seed", "1"]) == 2
    assert main(["prune", "--model", str(src), "--out", str(out), *ARGS]) == 0
    assert json.loads((out / "report.json").read_text())["execution"]["resumed_from_block"] == 3  # blocks 1, 2 done
    assert _hashes(out) == reference


def test_changed_model_refuses_to_resume(src, tmp_path, monkeypatch):
    from daprune.api import prune

    model_dir = save_model(tiny_model(layers=6), tmp_path / "m", tokenizer=False)
    out = tmp_path / "out"
    kw = dict(calibration="random", nsamples=8, seqlen=24, layers="1:-1", progress=False)
    _crash_at(monkeypatch, 1)
    with pytest.raises(Crash):
        prune(model=str(model_dir), out=str(out), **kw)
    monkeypatch.undo()
    save_model(tiny_model(layers=6, seed=1), model_dir, tokenizer=False)  # same path, new weights
    with pytest.raises(ResumeError, match="source.weights"):
        prune(model=str(model_dir), out=str(out), **kw)


def test_unreadable_state_and_live_lock(src, tmp_path, monkeypatch):
    from daprune.api import prune

    out = tmp_path / "out"
    kw = dict(calibration="random", nsamples=8, seqlen=24, layers="1:-1", progress=False)
    work = _work(out)
    work.mkdir()
    (work / "state.json").write_text("{not json")
    with pytest.raises(ResumeError, match="unreadable state.json"):
        prune(model=str(src), out=str(out), **kw)
    (work / "state.json").unlink()
    (work / "lock").write_text(str(os.getppid()))  # a live process that is not us
    with pytest.raises(ResumeError, match="another daprune process"):
        prune(model=str(src), out=str(out), **kw)
    (work / "lock").write_text("999999999")  # a dead one (e.g. killed): taken over
    assert prune(model=str(src), out=str(out), **kw).report["execution"]["resumed_from_block"] is None


def test_block_seeds_do_not_depend_on_history():
    """Per-block seeds: what block k draws is the same whether or not blocks 0..k-1 ran in this process."""
    from daprune.pipeline import _seed_block

    _seed_block(0, 3)
    a = torch.rand(4)
    _seed_block(0, 1)
    torch.rand(100)
    _seed_block(0, 3)
    assert torch.equal(torch.rand(4), a)
    _seed_block(1, 3)
    assert not torch.equal(torch.rand(4), a)


def test_in_memory_path_resumes_too(tmp_path, monkeypatch):
    """--no-streaming (whole model loaded) checkpoints blocks the same way and restores them on resume."""
    folder = save_model(tiny_model(layers=5), tmp_path / "src")  # with a tokenizer: load_model needs one
    args = ["--model", str(folder), "--no-streaming", *ARGS]
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["prune", "--out", str(ref), *args]) == 0
    _crash_at(monkeypatch, 2)
    with pytest.raises(Crash):
        main(["prune", "--out", str(out), *args])
    monkeypatch.undo()
    assert main(["prune", "--out", str(out), *args]) == 0
    assert _hashes(out) == _hashes(ref)
    report = json.loads((out / "report.json").read_text())
    assert report["execution"] == {"device": "cpu", "streaming": False, "activations": "device",
                                   "resumed_from_block": 3, "reused_prepasses": []}


def test_adaptive_schedule_resumes_with_its_saved_plans(src, tmp_path, monkeypatch):
    """The global (adaptive) plans are computed once, on the dense model, and kept in the checkpoint."""
    import daprune.adaptive as adaptive

    args = ["--model", str(src), *ARGS, "--schedule", "adaptive", "--ffn-criterion", "flap", "--head-criterion",
            "flap"]
    _resume_without_recomputing(tmp_path, monkeypatch, args, adaptive, "adaptive_plans", "plans were recomputed")


def _resume_without_recomputing(tmp_path, monkeypatch, args: list[str], module, name: str | tuple[str, ...], why: str,
                                crash: int | str = 2, also: tuple[str, ...] = ()) -> tuple[Path, Path]:
    """Run ``args`` once whole (ref) and once crashed after block 2 (or right after pre-pass ``crash``) then resumed
    (out) with ``module.name`` (each of several names) and the dotted targets ``also`` made to fail: a global
    schedule's result, a pre-pass or the calibration rows must come from the checkpoint. Both outputs are
    byte-identical."""
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["prune", "--out", str(ref), *args]) == 0
    _crash_at(monkeypatch, crash)
    with pytest.raises(Crash):
        main(["prune", "--out", str(out), *args])
    monkeypatch.undo()
    for each in (name,) if isinstance(name, str) else name:
        monkeypatch.setattr(module, each, lambda *a, **k: pytest.fail(why))
    for target in also:
        monkeypatch.setattr(target, lambda *a, **k: pytest.fail(why))
    assert main(["prune", "--out", str(out), *args]) == 0
    assert _hashes(out) == _hashes(ref)
    return ref, out


def test_copy_rows_resume_reads_the_copied_rows_back(src, tmp_path, monkeypatch):
    """Self-generated rows are kept in the work folder as the prune read them, copies made: a resumed run neither
    draws nor copies again, writes the same model and reports the same rows and copy record."""
    import daprune.data.calibration as calibration

    args = ["--model", str(src), *ARGS, "--calibration", "self", "--copy-rows", "0.25"]  # the later --calibration wins
    ref, out = _resume_without_recomputing(tmp_path, monkeypatch, args, calibration, "calibration_tokens",
                                           "rows were drawn or copied again",
                                           also=("daprune.data.copy_rows.copy_halves",))
    got, want = (json.loads((f / "report.json").read_text())["calibration"] for f in (out, ref))
    assert got["copy_rows"] == want["copy_rows"] and want["copy_rows"]["fraction"] == 0.25
    assert want["copy_rows"]["rows"] == 2  # rows 3 and 7 of the 8
    assert got["ids_sha256"] == want["ids_sha256"] and got["reused_from_work_folder"] is True


def test_sensitivity_schedule_resumes_with_its_saved_shares(src, tmp_path, monkeypatch):
    """The measured per-block shares are kept in the checkpoint: a resumed run neither re-measures nor drifts."""
    import daprune.allocation as allocation

    args = ["--model", str(src), *[a for a in ARGS if a not in ("--layers", "1:-1")], "--schedule", "sensitivity"]
    ref, out = _resume_without_recomputing(tmp_path, monkeypatch, args, allocation, "sensitivity_targets",
                                           "shares were re-measured")
    saved, first = (json.loads((f / "report.json").read_text())["allocation"] for f in (out, ref))
    saved.pop("seconds"), first.pop("seconds")  # the interrupted run's measuring time, carried over
    assert saved == first


def test_owl_schedule_resumes_with_its_saved_shares(src, tmp_path, monkeypatch):
    """The outlier-ratio shares are kept in the checkpoint too: a resumed run does not recompute them."""
    import daprune.owl as owl

    args = ["--model", str(src), *[a for a in ARGS if a not in ("--layers", "1:-1")], "--schedule", "owl",
            "--layers", "0:", "--owl-threshold", "2"]
    ref, out = _resume_without_recomputing(tmp_path, monkeypatch, args, owl, "owl_targets", "shares were recomputed")
    saved, first = (json.loads((f / "report.json").read_text())["allocation"] for f in (out, ref))
    saved.pop("seconds"), first.pop("seconds")
    assert saved == first and saved["mode"] == "owl"


def test_kill9_during_output_assembly_leaves_nothing_behind(tmp_path):
    """A kill -9 inside output.atomic_dir orphans its temp folder (and, mid-overwrite, the old output); the next
    atomic_dir for that output removes the dead process's leftovers and nothing else."""
    import shutil

    from daprune.atomic import owner_tag
    from daprune.output import atomic_dir

    out = tmp_path / "out"
    code = ("import os, signal, sys\nfrom pathlib import Path\nfrom daprune.output import atomic_dir\n"
            "with atomic_dir(sys.argv[1]) as tmp:\n    (Path(tmp) / 'half.safetensors').write_bytes(b'x')\n"
            "    os.kill(os.getpid(), signal.SIGKILL)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    orphans = [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.tmp-")]
    assert len(orphans) == 1 and not out.exists()
    dead_pid = int(orphans[0].split("-")[1])
    host = owner_tag().split("-")[1]
    (tmp_path / f".out.old-{dead_pid}-{host}").mkdir()  # a kill between the two renames of an --overwrite
    kept = [f".out.tmp-{os.getpid()}-{host}-mine", f".out.old-{os.getppid()}-{host}",  # live processes
            f".out.tmp-{dead_pid}-{'0' * 8 if host != '0' * 8 else '1' * 8}-x",  # another host's
            ".out.tmp-abc123",  # no owner in the name: never guessed
            f".other.tmp-{dead_pid}-{host}-x"]  # another output's
    for name in kept:
        (tmp_path / name).mkdir()
    with atomic_dir(out) as tmp:
        assert tmp.name.startswith(f".out.tmp-{owner_tag()}-")
        (tmp / "done").write_text("ok")
    assert (out / "done").read_text() == "ok"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != "out") == sorted(kept)
    for name in kept:
        shutil.rmtree(tmp_path / name)


# -- gradient pre-passes (fisher / kfac weights, Taylor gradients) kept in the work folder -------------------------
TAYLOR = ["--ffn-criterion", "taylor-e1", "--head-criterion", "taylor-e1"]
PREPASSES = {  # pre-pass -> (its settings, the module and functions that compute it)
    "fisher": (["--error-weight", "kfac"], "daprune.fisher", ("output_fisher", "streamed_output_fisher")),
    "gradients": (TAYLOR, "daprune.criteria.taylor", ("collect_gradients", "streamed_gradients")),
    "token-gradients": (["--token-weight", "gradient"], "daprune.fisher", ("token_gradients",)),
}


def _prepass_args(folder: Path, prepass: str, streaming: bool) -> list[str]:
    at = ARGS.index("--ffn-criterion")
    base = ARGS[:at] + ARGS[at + 2 :]  # each pre-pass has its own criteria
    return ["--model", str(folder), "--streaming" if streaming else "--no-streaming", *base, *PREPASSES[prepass][0]]


def _prepass_files(prepass: str, layers: int) -> list[str]:
    if prepass in ("fisher", "token-gradients"):
        return [f"{prepass}/all.safetensors"]
    return [f"gradients/layer-{i:05d}.safetensors" for i in range(layers)]


@pytest.mark.parametrize("prepass", ["fisher", "gradients", "token-gradients"])
@pytest.mark.parametrize("streaming,crash", [(True, "prepass"), (False, "prepass"), (True, 2)])
def test_a_resumed_run_reuses_the_gradient_prepass(tmp_path, monkeypatch, prepass, streaming, crash):
    """Killed right after the pre-pass is committed (or after block 2), the rerun reads the kfac weights / Taylor
    gradients from the work folder: the functions that compute them fail if called, and the output files are
    byte-identical to an uninterrupted run's, streaming or in memory. When the pre-pass is committed its files are
    all written and the state does not name it yet (the commit comes last)."""
    import importlib

    from daprune.checkpoint import WorkDir

    _, module, names = PREPASSES[prepass]
    folder = save_model(tiny_model(layers=5), tmp_path / "src")  # with a tokenizer: --no-streaming needs one
    args = _prepass_args(folder, prepass, streaming)
    at_commit: dict = {}
    commit = WorkDir.mark_prepass

    def mark(self, name: str) -> None:
        at_commit.update(prepasses=json.loads((self.path / "state.json").read_text()).get("prepasses", []),
                         files=sorted(str(p.relative_to(self.path)) for p in (self.path / name).iterdir()))
        commit(self, name)

    monkeypatch.setattr(WorkDir, "mark_prepass", mark)
    ref, out = _resume_without_recomputing(tmp_path, monkeypatch, args, importlib.import_module(module), names,
                                           f"the {prepass} pre-pass was recomputed",
                                           crash=prepass if crash == "prepass" else crash)
    assert at_commit == {"prepasses": [], "files": _prepass_files(prepass, 5)}
    first, resumed = (json.loads((f / "report.json").read_text())["execution"] for f in (ref, out))
    assert first["reused_prepasses"] == [] and resumed["reused_prepasses"] == [prepass]
    assert first["streaming"] is resumed["streaming"] is streaming
    assert resumed["resumed_from_block"] == (None if crash == "prepass" else 3)
    assert not _work(out).exists()


def test_kill9_after_the_streamed_taylor_gradients_then_resume(src, tmp_path, monkeypatch):
    """The real thing for the pre-pass: SIGKILL in a subprocess right after the streamed gradients are committed
    (``DAPRUNE_TEST_KILL_AFTER_BLOCK=gradients``); the work folder holds every block's file and names the pre-pass,
    and the same command, with the gradient pass made to fail, finishes with the uninterrupted run's files."""
    import daprune.criteria.taylor as taylor

    args = _prepass_args(src, "gradients", True)
    ref, out = tmp_path / "ref", tmp_path / "out"
    assert main(["prune", "--out", str(ref), *args]) == 0
    cmd = [sys.executable, "-m", "daprune.cli", "prune", "--out", str(out), *args]
    env = {**os.environ, KILL_ENV: "gradients", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((_work(out) / "state.json").read_text())
    assert state["prepasses"] == ["gradients"] and state["next_block"] == 0
    assert sorted(str(p.relative_to(_work(out))) for p in (_work(out) / "gradients").iterdir()) == \
        _prepass_files("gradients", 6)
    monkeypatch.setattr(taylor, "streamed_gradients", lambda *a, **k: pytest.fail("gradients were recomputed"))
    assert main(["prune", "--out", str(out), *args]) == 0
    assert _hashes(out) == _hashes(ref)
    report = json.loads((out / "report.json").read_text())
    assert report["execution"]["streaming"] and report["execution"]["reused_prepasses"] == ["gradients"]


def test_prepass_files_of_other_settings_are_never_read(src, tmp_path, monkeypatch, capsys):
    """The kfac weights of an interrupted run belong to its identity: other settings (fewer rows for the pass) are
    refused while its folder exists, and with --no-resume the pass runs again instead of reading them."""
    out = tmp_path / "out"
    args = ["--out", str(out), *_prepass_args(src, "fisher", True)]
    _crash_at(monkeypatch, "fisher")
    with pytest.raises(Crash):
        main(["prune", *args])
    monkeypatch.undo()
    assert (_work(out) / "fisher" / "all.safetensors").is_file()
    changed = [*args, "--fisher-nsamples", "4"]
    capsys.readouterr()
    assert main(["prune", *changed]) == 2
    assert "fisher_nsamples: null -> 4" in capsys.readouterr().err
    assert main(["prune", *changed, "--no-resume"]) == 0
    assert json.loads((out / "report.json").read_text())["execution"]["reused_prepasses"] == []


def test_block_files_read_one_block_when_asked(tmp_path):
    """Per-block pre-pass files round-trip exactly, are read only when a block is looked up (a file written after the
    mapping was made is seen; nothing is read before), give the pipeline's ``get`` default outside the blocks, and a
    damaged file is a ResumeError that keeps the work folder."""
    from daprune.checkpoint import BlockFiles, WorkDir, load_block_tensors, save_block_tensors

    work = WorkDir(tmp_path / "w")
    work.open({"settings": {}}, resume=True)
    files = BlockFiles(lambda i: work.prepass_file("gradients", i), range(3))
    assert len(files) == 3 and list(files) == [0, 1, 2] and files.get(7, "none") == "none"
    g = {"q": torch.randn(4, 3), "down": torch.randn(3, 5, dtype=torch.float64)}
    save_block_tensors(work.prepass_file("gradients", 1), {1: g})
    got = files[1]
    assert sorted(got) == sorted(g) and all(torch.equal(got[k], g[k]) and got[k].dtype == g[k].dtype for k in g)
    save_block_tensors(work.prepass_file("fisher"), {0: {"o": torch.ones(2)}, 2: {"down": torch.zeros(3)}})
    both = load_block_tensors(work.prepass_file("fisher"))
    assert sorted(both) == [0, 2] and torch.equal(both[2]["down"], torch.zeros(3))
    assert not work.prepass_done("gradients")
    work.mark_prepass("gradients")
    assert work.prepass_done("gradients") and json.loads((work.path / "state.json").read_text())["prepasses"] == [
        "gradients"]
    work.prepass_file("gradients", 2).write_bytes(b"not safetensors")
    with pytest.raises(ResumeError, match="layer-00002.safetensors") as caught:
        files[2]
    assert caught.value.keeps_work


def test_a_commit_writes_only_its_own_blocks_record(tmp_path):
    """state.json stays the same size however many blocks are done (each block's record is its own file, so the
    checkpoint writes of a deep model are not quadratic in its depth); the records come back in order; a missing
    record file is a ResumeError; a folder of the earlier format (every record inside state.json) still resumes."""
    from daprune.checkpoint import WorkDir

    work = WorkDir(tmp_path / "w")
    work.open({"settings": {}}, resume=True)
    xp = torch.zeros(2, 3, 4)
    records, sizes = [], []
    for i in range(6):
        records.append({"index": i, "kept_channel_idx": list(range(500 + i))})
        work.block_file(i).write_bytes(b"")  # restore checks that each block's tensors exist
        work.commit(i, records, xp, None, None)
        sizes.append((work.path / "state.json").stat().st_size)
    assert max(sizes) - min(sizes) <= 2  # only the block number's digits change
    again = WorkDir(work.path)
    again.open({"settings": {}}, resume=True)
    got = again.restore(10)
    assert got.next_block == 6 and got.records == records
    state = json.loads((work.path / "state.json").read_text())
    state["records"] = records[:6]  # the earlier format
    (work.path / "state.json").write_text(json.dumps(state))
    for i in range(6):
        work.record_file(i).unlink()
    older = WorkDir(work.path)
    older.open({"settings": {}}, resume=True)
    assert older.restore(10).records == records
    del state["records"]
    (work.path / "state.json").write_text(json.dumps(state))
    broken = WorkDir(work.path)
    broken.open({"settings": {}}, resume=True)
    with pytest.raises(ResumeError, match="block record"):
        broken.restore(10)
