"""Fuzz suite (issue 13): every bad input and every fault is a one-line error and leaves nothing behind.

Each case breaks a copy of a tiny model folder (or the settings, or the place the output goes) and runs
``daprune prune`` in-process. It must exit with code 2, print exactly one line on stderr that starts with
``daprune: error:`` and names the problem, print no traceback, write no output folder, and change nothing
else under the test's temp folder (every file's bytes are compared before and after). Faults that happen
mid-run (a full disk) keep the work folder, say so, and the next run resumes; Ctrl-C and SIGTERM are sent
to a real subprocess. docs/scaling.md lists every case with its message.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_streaming import save_model, word_tokenizer

from daprune.cli import main

FAST = ["--calibration", "random", "--nsamples", "4", "--seqlen", "16", "--layers", "0:", "--sparsity", "0.2",
        "--quiet"]

pytestmark = pytest.mark.usefixtures("one_thread")


# -- helpers --------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return save_model(tiny_model(layers=2), tmp_path_factory.mktemp("fuzz") / "model")


@pytest.fixture
def model_dir(pristine, tmp_path) -> Path:
    """A fresh copy of a good tiny model folder (with a tokenizer), for each case to break."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


def snapshot(root: Path) -> dict[str, str]:
    """Every path under ``root`` with a hash of its bytes (folders as 'dir'): what 'nothing changed' compares."""
    out = {}
    for p in sorted(root.rglob("*")):
        out[str(p.relative_to(root))] = "dir" if p.is_dir() else hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def run_cli(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["prune", *args])
    return code, capsys.readouterr().err


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err[-3000:]
    assert lines[0].startswith("daprune: error: "), lines[0]
    assert "Traceback" not in err
    return lines[0]


def edit_config(folder: Path, **changes) -> None:
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


DELETE = object()


def rewrite_weights(folder: Path, change: Callable[[dict[str, torch.Tensor]], None]) -> None:
    from safetensors.torch import load_file, save_file

    f = folder / "model.safetensors"
    state = load_file(str(f))
    change(state)
    save_file(state, str(f), metadata={"format": "pt"})


def rewrite_header(folder: Path, change: Callable[[dict], None]) -> None:
    """Edit the JSON header of model.safetensors in place (the data bytes stay as they are)."""
    f = folder / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = json.loads(data[8:8 + n])
    change(header)
    raw = json.dumps(header).encode()
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def first_tensor(header: dict) -> str:
    return next(k for k in header if k != "__metadata__")


def set_item(state: dict, key: str, value: float) -> None:
    state[key].view(-1)[::7] = value  # many entries, so every calibration batch meets one


def text_calibration(tmp: Path, words: str) -> list[str]:
    text = tmp / "calib.txt"
    text.write_text(words)
    return ["--calibration", str(text)]


def gguf_header(version: int = 3, tensors: int = 10, kv: int = 5) -> bytes:
    return b"GGUF" + struct.pack("<I", version) + struct.pack("<QQ", tensors, kv)


# -- the cases: (id, build(model_dir, tmp) -> extra args, text the message must contain) -----------------------
def _sharded_cut(m: Path, tmp: Path) -> list[str]:
    folder = save_model(tiny_model(layers=2), tmp / "sharded", shard="40KB", tokenizer=False)
    shard = sorted(folder.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:100])  # a download or copy interrupted mid-write
    return ["--model", str(folder)]


def _missing_shard(m: Path, tmp: Path) -> list[str]:
    folder = save_model(tiny_model(layers=2), tmp / "sharded", shard="40KB", tokenizer=False)
    sorted(folder.glob("model-*.safetensors"))[1].unlink()
    return ["--model", str(folder)]


def _write(name: str, data: bytes):
    def build(m: Path, tmp: Path) -> list[str]:
        (m / name).write_bytes(data)
        return []
    return build


def _config(**changes):
    def build(m: Path, tmp: Path) -> list[str]:
        edit_config(m, **changes)
        return []
    return build


def _weights(change):
    def build(m: Path, tmp: Path) -> list[str]:
        rewrite_weights(m, change)
        return []
    return build


def _header(change):
    def build(m: Path, tmp: Path) -> list[str]:
        rewrite_header(m, change)
        return []
    return build


def _header_length(n: int):
    """The 8-byte header length claims more bytes than the file has."""
    def build(m: Path, tmp: Path) -> list[str]:
        f = m / "model.safetensors"
        f.write_bytes(struct.pack("<Q", n) + f.read_bytes()[8:])
        return []
    return build


def _args(*args: str):
    return lambda m, tmp: list(args)


def _gguf(data: bytes | None):
    def build(m: Path, tmp: Path) -> list[str]:
        f = tmp / "model.gguf"
        if data is not None:
            f.write_bytes(data)
        return ["--model", str(f), "--cache-dir", str(tmp / "cache")]
    return build


def _truncate(m: Path, tmp: Path) -> list[str]:
    f = m / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    return []


def _no_config(m: Path, tmp: Path) -> list[str]:
    (m / "config.json").unlink()
    return []


def _big_tokenizer(m: Path, tmp: Path) -> list[str]:
    word_tokenizer(300).save_pretrained(m)  # ids up to 299; the model has 128 embeddings
    return text_calibration(tmp, " ".join(f"w{200 + i % 90}" for i in range(600)))


def _no_tokenizer_text(m: Path, tmp: Path) -> list[str]:
    for p in m.iterdir():
        if p.name.startswith("tokenizer") or p.name == "special_tokens_map.json":
            p.unlink()
    return text_calibration(tmp, "w5 w6 " * 400)


def _pickle_streaming(m: Path, tmp: Path) -> list[str]:
    from safetensors.torch import load_file

    torch.save(load_file(str(m / "model.safetensors")), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()
    return ["--streaming"]


def _output_exists(m: Path, tmp: Path) -> list[str]:
    (tmp / "taken").mkdir()
    (tmp / "taken" / "keep.txt").write_text("mine")
    return ["--out", str(tmp / "taken")]


def _output_under_file(m: Path, tmp: Path) -> list[str]:
    (tmp / "file.txt").write_text("x")
    return ["--out", str(tmp / "file.txt" / "out")]


def _foreign_work_folder(m: Path, tmp: Path) -> list[str]:
    """A work folder left by an interrupted run with other settings: refused, kept untouched."""
    work = tmp / "out.daprune-work"
    work.mkdir()
    from daprune.checkpoint import FORMAT

    (work / "state.json").write_text(json.dumps({"format": FORMAT, "identity": {"settings": {"sparsity": 0.5}},
                                                 "next_block": 1}))
    return []


def _cut_state(m: Path, tmp: Path) -> list[str]:
    work = tmp / "out.daprune-work"
    work.mkdir()
    (work / "state.json").write_text('{"format": 1, "next_blo')  # an interrupted write of the commit record
    return []


def _locked_work_folder(m: Path, tmp: Path) -> list[str]:
    work = tmp / "out.daprune-work"
    work.mkdir()
    (work / "lock").write_text(str(os.getppid()))  # a live process (pytest's parent) holds it
    return []


CASES: list[tuple[str, Callable[[Path, Path], list[str]], str]] = [
    # weights files
    ("safetensors-truncated", _truncate, "truncated, corrupt or not safetensors"),
    ("safetensors-empty", _write("model.safetensors", b""), "header too small"),
    ("safetensors-garbage", _write("model.safetensors", b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage}" * 4),
     "cannot read weights file"),
    ("safetensors-header-length-beyond-file", _header_length(10**6), "cannot read weights file"),
    ("safetensors-offsets-out-of-range",
     _header(lambda h: h[first_tensor(h)].update({"data_offsets": [0, 10**9]})), "invalid shape, data type, or offset"),
    ("safetensors-integer-dtype", _header(lambda h: h[first_tensor(h)].update({"dtype": "I32"})),
     "are not floating point"),
    ("weights-int32-tensor", _weights(lambda s: s.update({"model.layers.0.mlp.up_proj.weight":
                                                          s["model.layers.0.mlp.up_proj.weight"].to(torch.int32)})),
     "model.layers.0.mlp.up_proj.weight is I32"),
    ("weights-nan", _weights(lambda s: set_item(s, "model.layers.0.mlp.up_proj.weight", float("nan"))),
     "non-finite activations at block 0 down_in: the model's weights hold NaN or inf"),
    ("weights-inf", _weights(lambda s: set_item(s, "model.layers.1.self_attn.v_proj.weight", float("inf"))),
     "non-finite activations at block 1"),
    ("weights-missing-tensor", _weights(lambda s: s.pop("model.layers.1.mlp.up_proj.weight")),
     "1 tensor(s) missing (e.g. model.layers.1.mlp.up_proj.weight)"),
    ("shard-cut-mid-write", _sharded_cut, "truncated, corrupt or not safetensors"),
    ("index-names-missing-shard", _missing_shard, "names shard(s) that do not exist"),
    ("index-not-json", _write("model.safetensors.index.json", b"{oops"), "is not a valid safetensors index"),
    ("index-without-weight-map", _write("model.safetensors.index.json", b'{"metadata": {}}'),
     "'weight_map' must map tensor names to shard file names"),
    ("index-weight-map-a-list", _write("model.safetensors.index.json", b'{"weight_map": ["a"]}'),
     "'weight_map' must map tensor names to shard file names"),
    ("index-shard-name-a-number", _write("model.safetensors.index.json", b'{"weight_map": {"a": 3}}'),
     "'weight_map' must map tensor names to shard file names"),
    # GGUF
    ("gguf-random-bytes", _gguf(b"GGUF" + bytes(range(256)) * 4), "cannot read GGUF file"),
    ("gguf-truncated-header", _gguf(gguf_header()[:14]), "cannot read GGUF file"),
    ("gguf-wrong-magic", _gguf(b"not a gguf file at all" * 10), "cannot read GGUF file"),
    ("gguf-missing-file", _gguf(None), "GGUF file not found"),
    # config.json
    ("config-not-json", _write("config.json", b"{oops"), "is not a valid JSON file"),
    ("config-a-list", _write("config.json", b"[1, 2]"), "cannot read the model config"),
    ("config-without-model-type", _config(model_type=DELETE), "Should have a `model_type` key"),
    ("config-unknown-model-type", _config(model_type="nonsense"), "does not recognize this architecture"),
    ("config-unsupported-architecture", _config(model_type="bert"), "unsupported architecture 'bert'"),
    ("config-negative-vocab", _config(vocab_size=-1), "vocab_size must be a positive whole number, got -1"),
    ("config-zero-layers", _config(num_hidden_layers=0), "num_hidden_layers must be a positive whole number"),
    ("config-non-numeric-size", _config(hidden_size="big"), "'hidden_size' expected int, got str"),
    ("config-heads-not-multiple-of-kv", _config(num_key_value_heads=4),
     "num_attention_heads (6) is not a multiple of num_key_value_heads (4)"),
    ("config-hidden-not-multiple-of-heads", _config(num_attention_heads=5),
     "not a multiple of the number of attention"),
    ("config-shapes-differ-from-weights", _config(intermediate_size=80),
     "is [96, 48] in the file but the config implies [80, 48]"),
    ("config-context-shorter-than-seqlen", _config(max_position_embeddings=8),
     "--seqlen 16 is longer than the model's context"),
    ("config-missing", _no_config, "has no config.json"),
    ("model-path-missing", _args("--model", "/nonexistent/daprune-model"), "model path not found"),
    # tokenizer and calibration
    ("tokenizer-ids-beyond-vocabulary", _big_tokenizer, "vocabulary has 128 entries"),
    ("tokenizer-unreadable", _write("tokenizer.json", b"{broken"), "cannot load the tokenizer"),
    ("tokenizer-absent-text-calibration", _no_tokenizer_text, "needs a tokenizer, but the model folder has none"),
    ("calibration-file-missing", _args("--calibration", "/nonexistent/calib.txt"), "calibration file not found"),
    ("calibration-text-too-short", lambda m, tmp: text_calibration(tmp, "w5 w6 w7"), "calibration text has"),
    # settings
    ("sparsity-above-one", _args("--sparsity", "1.5"), "--sparsity must be in [0, 1)"),
    ("sparsity-nan", _args("--sparsity", "nan"), "--sparsity must be in [0, 1), got nan"),
    ("nsamples-zero", _args("--nsamples", "0"), "--nsamples must be >= 1"),
    ("nsamples-non-numeric", _args("--nsamples", "abc"), "argument --nsamples: invalid int value: 'abc'"),
    ("nsamples-beyond-memory", _args("--nsamples", "100000000"), "not enough memory: this run needs about"),
    ("seqlen-one", _args("--seqlen", "1"), "--seqlen >= 2"),
    ("seqlen-beyond-context", _args("--seqlen", "100000"),
     "--seqlen 100000 is longer than the model's context: "),
    ("sparsity-non-numeric", _args("--sparsity", "lots"), "argument --sparsity: invalid float value: 'lots'"),
    ("layers-not-a-range", _args("--layers", "1:2:3"), "--layers must look like 'START:STOP'"),
    ("layers-empty-range", _args("--layers", "1:1"), "selects no block of a model with 2 blocks"),
    ("tau-nan", _args("--tau", "nan"), "--tau must be a finite number >= 0, got nan"),
    ("recovery-damp-negative", _args("--recovery", "paper", "--recovery-damp", "-1"),
     "--recovery-damp must be a finite number > 0"),
    ("obs-damp-inf", _args("--obs-damp", "inf"), "--obs-damp must be a finite number >= 0"),
    ("seed-beyond-64-bits", _args("--seed", str(2**70)), "--seed must be in [0, 2**63)"),
    ("seed-negative", _args("--seed", "-1"), "--seed must be in [0, 2**63)"),
    ("dtype-unknown", _args("--dtype", "int8"), "argument --dtype: invalid choice: 'int8'"),
    ("device-unknown", _args("--device", "quantum"), "unknown --device 'quantum'"),
    ("batch-size-zero", _args("--batch-size", "0"), "--batch-size must be >= 1"),
    ("channel-multiple-zero", _args("--channel-multiple", "0"), "--channel-multiple must be >= 1"),
    ("recovery-nsamples-below-nsamples", _args("--recovery", "paper", "--recovery-nsamples", "2"),
     "--recovery-nsamples (2) must be >= --nsamples (4)"),
    ("streaming-with-pickle-weights", _pickle_streaming, "--streaming is not possible here"),
    # output place and work folder
    ("output-exists", _output_exists, "already exists; pass --overwrite"),
    ("output-under-a-file", _output_under_file, "is a file, not a folder"),
    ("output-unwritable", _args("--out", "/proc/daprune-fuzz-out"), "cannot write"),
    ("work-folder-of-other-settings", _foreign_work_folder, "holds an interrupted run with different settings"),
    ("work-folder-state-cut-mid-write", _cut_state, "unreadable state.json"),
    ("work-folder-locked-by-live-process", _locked_work_folder, "is using the work folder"),
]
if not torch.cuda.is_available():
    CASES.append(("device-cuda-absent", _args("--device", "cuda"), "no CUDA device is visible"))


def test_the_suite_covers_at_least_30_distinct_cases():
    ids = [c[0] for c in CASES]
    assert len(ids) == len(set(ids)) and len(ids) >= 30, len(ids)


@pytest.mark.parametrize("build,needle", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_leaves_nothing(capsys, model_dir, tmp_path, build, needle):
    args = build(model_dir, tmp_path)
    out = tmp_path / "out"
    if "--out" not in args:
        args = ["--out", str(out), *args]
    if "--model" not in args:
        args = ["--model", str(model_dir), *args]
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, *FAST, *args)
    assert code == 2, err[-3000:]
    line = one_error_line(err)
    assert needle in line, line
    assert not out.exists()
    assert snapshot(tmp_path) == before  # no temp folder, no work folder, no cache, inputs untouched


# -- resources: memory and disk, checked up front ---------------------------------------------------------------
def test_memory_check_suggests_disk_activations_where_they_fit(capsys, model_dir, tmp_path, monkeypatch):
    """2 x 1.5 MiB of streams do not fit in 1 MiB above the runtime; on disk they do, and the run then passes."""
    import daprune.resources as res

    budget = res.OVERHEAD_BYTES + 2**20
    monkeypatch.setattr(res, "available_memory", lambda: budget)
    args = ["--model", str(model_dir), "--out", str(tmp_path / "out"), *FAST, "--nsamples", "256"]
    code, err = run_cli(capsys, *args)
    line = one_error_line(err)
    assert code == 2 and "not enough memory" in line and "--activations disk would fit" in line, line
    assert "nsamples 256 x seqlen 16 x hidden 48 x 4 bytes" in line
    code, err = run_cli(capsys, *args, "--activations", "disk")
    assert code == 0, err[-3000:]
    resources = json.loads((tmp_path / "out" / "report.json").read_text())["resources"]
    assert resources["available_memory"] == budget
    est = resources["estimate"]
    assert est["streams"] == 2 * 256 * 16 * 48 * 4 and est["streams_on_disk"]
    assert est["ram"] <= budget < est["ram"] + est["streams"]


def test_memory_check_suggests_fewer_samples_when_disk_cannot_help(capsys, model_dir, tmp_path, monkeypatch):
    """Streams already on disk: the calibration ids (16384 x 16 x 8 bytes = 2 MiB) alone exceed the budget."""
    import daprune.resources as res

    monkeypatch.setattr(res, "available_memory", lambda: res.OVERHEAD_BYTES + 2**20)
    code, err = run_cli(capsys, "--model", str(model_dir), "--out", str(tmp_path / "out"), *FAST,
                        "--nsamples", "16384", "--activations", "disk")
    line = one_error_line(err)
    assert code == 2 and "use --nsamples" in line and "or fewer" in line, line
    suggested = int(line.split("use --nsamples ")[1].split()[0])
    assert 1 <= suggested < 16384


def test_report_records_the_resource_estimate(capsys, model_dir, tmp_path):
    code, err = run_cli(capsys, "--model", str(model_dir), "--out", str(tmp_path / "out"), *FAST)
    assert code == 0, err[-3000:]
    resources = json.loads((tmp_path / "out" / "report.json").read_text())["resources"]
    est = resources["estimate"]
    assert est["numbers"]["nsamples"] == 4 and est["numbers"]["seqlen"] == 16 and est["numbers"]["hidden"] == 48
    assert est["streams"] == 2 * 4 * 16 * 48 * 4
    assert resources["available_memory"] > 0 and resources["disk"]["output_free"] > 0
    written = sum(p.stat().st_size for p in (tmp_path / "out").glob("*.safetensors"))
    assert 0.5 * written < est["output"] < 1.5 * written  # the output size estimate is close to what was written


TAYLOR = ["--ffn-criterion", "taylor-e1", "--head-criterion", "taylor-e1", "--streaming"]


def test_the_estimate_counts_the_streamed_gradient_pass(capsys, model_dir, tmp_path, monkeypatch):
    """A streamed Taylor run's estimate has the pre-pass's files on disk (4 bytes per block parameter: within 1% of
    what the interrupted run really wrote) and a pass term holding every block's input (3 streams of 4 x 16 x 48
    fp32 for 2 blocks and the last output) and two fp32 gradient streams; RAM is the larger of that pass and the
    block loop, plus what both keep."""
    from safetensors.torch import load_file
    from test_resume import Crash, _crash_at

    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--out", str(out), *FAST, *TAYLOR]
    _crash_at(monkeypatch, "gradients")
    with pytest.raises(Crash):
        main(["prune", *args])
    monkeypatch.undo()
    written = sum(p.stat().st_size for p in (out.with_name("out.daprune-work") / "gradients").iterdir())
    code, err = run_cli(capsys, *args)
    assert code == 0, err[-3000:]
    est = json.loads((out / "report.json").read_text())["resources"]["estimate"]
    weights = load_file(str(model_dir / "model.safetensors"))
    block_params = sum(t.numel() for k, t in weights.items() if ".layers." in k)
    assert est["gradient_files"] == 4 * block_params and 0.99 * written < est["gradient_files"] < 1.01 * written
    assert est["gradient_inputs"] == 4 * 16 * 48 * (3 * 4 + 2 * 4)
    assert est["gradient_pass"] > est["gradient_inputs"] and est["gradient_ram"] == est["gradient_pass"]
    assert est["numbers"]["gradient_rows"] == 4 and est["numbers"]["gradient_for"] == "Taylor gradients"
    assert est["ram"] == max(est["pipeline_ram"], est["gradient_ram"]) + est["ids"] + est["resident_weights"] \
        + est["overhead"]
    assert est["work_disk"] == est["output"] + est["streams"] + est["gradient_files"]


def test_a_gradient_pass_that_does_not_fit_is_refused_by_name(capsys, model_dir, tmp_path, monkeypatch):
    """One byte less than a streamed Taylor run's estimate: refused before any work, the message naming the gradient
    pass and its rows; the same run without the Taylor criteria (no pass) fits that budget."""
    import daprune.resources as res

    args = ["--model", str(model_dir), "--out", str(tmp_path / "out"), *FAST]
    assert run_cli(capsys, *args, *TAYLOR)[0] == 0
    est = json.loads((tmp_path / "out" / "report.json").read_text())["resources"]["estimate"]
    assert est["gradient_ram"] > est["pipeline_ram"]  # the pass, not the block loop, sets the peak
    shutil.rmtree(tmp_path / "out")
    monkeypatch.setattr(res, "available_memory", lambda: est["ram"] - 1)
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, *args, *TAYLOR)
    line = one_error_line(err)
    assert code == 2 and "not enough memory" in line and "a gradient pass over 4 rows (Taylor gradients)" in line
    assert snapshot(tmp_path) == before
    code, err = run_cli(capsys, *args, "--streaming")
    assert code == 0, err[-3000:]


def test_disk_too_small_is_refused_up_front(capsys, model_dir, tmp_path, monkeypatch):
    import daprune.resources as res

    real = shutil.disk_usage
    monkeypatch.setattr(res.shutil, "disk_usage", lambda p: real(p)._replace(free=1000))
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "--model", str(model_dir), "--out", str(tmp_path / "out"), *FAST)
    line = one_error_line(err)
    assert code == 2 and "not enough disk space: the output" in line and "only 0.0 MiB are free" in line, line
    assert snapshot(tmp_path) == before


def test_read_only_output_place(capsys, model_dir, tmp_path, monkeypatch):
    """A read-only mount (simulated: creating any file there fails with EROFS) is refused before any work."""
    import tempfile

    def read_only(*a, **k):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    before = snapshot(tmp_path)
    code, err = run_cli(capsys, "--model", str(model_dir), "--out", str(tmp_path / "out"), *FAST)
    line = one_error_line(err)
    assert code == 2 and "cannot write to" in line and "Read-only file system" in line, line
    assert snapshot(tmp_path) == before


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def _safetensors_enospc(*_a, **_k):
    from safetensors import SafetensorError

    raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space '
                          'left on device" })')


@pytest.mark.parametrize("target,fault,where", [
    ("daprune.output.write_remote_code", _enospc, "the output folder"),  # OSError ENOSPC
    ("daprune.output.write_streaming_output", _safetensors_enospc, "the output folder"),  # safetensors' error
])
def test_disk_full_while_writing_output_keeps_work_and_resumes(capsys, model_dir, tmp_path, monkeypatch, target,
                                                               fault, where):
    monkeypatch.setattr(target, fault)
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--out", str(out), *FAST]
    code, err = run_cli(capsys, *args)
    line = one_error_line(err)
    assert code == 2 and f"no space left on device while writing {where}" in line, line
    assert "the output needs about" in line and "is kept: free some space and run the same command again" in line
    work = tmp_path / "out.daprune-work"
    assert not out.exists() and work.is_dir()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]  # no half-written temp folder
    monkeypatch.undo()
    code, err = run_cli(capsys, *args)
    assert code == 0, err[-3000:]
    assert json.loads((out / "report.json").read_text())["execution"]["resumed_from_block"] == 2
    assert not work.exists()


def test_disk_full_while_checkpointing_keeps_work_and_resumes(capsys, model_dir, tmp_path, monkeypatch):
    import daprune.checkpoint as ck

    real = ck.atomic_save_tensors
    calls = []

    def fill_up(path, tensors, metadata=None):
        calls.append(path.name)
        if path.name.startswith("streams-00001"):  # block 0 is committed, block 1's checkpoint fills the disk
            _enospc()
        return real(path, tensors, metadata)

    monkeypatch.setattr(ck, "atomic_save_tensors", fill_up)
    out = tmp_path / "out"
    args = ["--model", str(model_dir), "--out", str(out), *FAST]
    code, err = run_cli(capsys, *args)
    line = one_error_line(err)
    assert code == 2 and "no space left on device while writing the work folder" in line, line
    assert not out.exists() and (tmp_path / "out.daprune-work" / "state.json").is_file()
    monkeypatch.undo()
    code, err = run_cli(capsys, *args)
    assert code == 0, err[-3000:]
    assert json.loads((out / "report.json").read_text())["execution"]["resumed_from_block"] == 1


# -- a model folder with pickle weights and no tokenizer ------------------------------------------------------
def test_pickle_weights_without_tokenizer_prune_with_random_calibration(capsys, model_dir, tmp_path):
    """Random ids need no tokenizer: the folder is pruned (in memory), and the output has no tokenizer files."""
    from safetensors.torch import load_file

    torch.save(load_file(str(model_dir / "model.safetensors")), model_dir / "pytorch_model.bin")
    (model_dir / "model.safetensors").unlink()
    for p in model_dir.iterdir():
        if p.name.startswith("tokenizer") or p.name == "special_tokens_map.json":
            p.unlink()
    out = tmp_path / "out"
    code, err = run_cli(capsys, "--model", str(model_dir), "--out", str(out), *FAST)
    assert code == 0, err[-3000:]
    assert (out / "model.safetensors").is_file() or list(out.glob("model-*.safetensors"))
    assert not [p.name for p in out.iterdir() if p.name.startswith("tokenizer")]
    assert json.loads((out / "report.json").read_text())["execution"]["streaming"] is False


def test_eval_of_a_folder_without_tokenizer_is_one_line(capsys, tmp_path):
    """Evaluation tokenizes text: there the missing tokenizer is an error (prune with random ids needs none)."""
    folder = save_model(tiny_model(layers=2), tmp_path / "model", tokenizer=False)
    before = snapshot(tmp_path)
    capsys.readouterr()
    code = main(["eval", "--model", str(folder), "--ppl", "wikitext2", "--quiet"])
    line = one_error_line(capsys.readouterr().err)
    assert code == 2 and f"{folder} has no tokenizer (tokenizer.json" in line, line
    assert snapshot(tmp_path) == before


# -- Ctrl-C and SIGTERM in a real subprocess --------------------------------------------------------------------
_CHILD = """
import os, signal, sys
import daprune.checkpoint as ck

def hook(block, phase):  # the signal arrives mid-run, right after block 1's checkpoint
    if block == 1 and phase == "":
        os.kill(os.getpid(), signal.{sig})

ck._test_kill = hook
# a runner started in the background (`cmd &` in a script) hands SIGINT down ignored, and Python then never turns
# it into KeyboardInterrupt: restore the default, as an interactive shell would have it
signal.signal(signal.SIGINT, signal.default_int_handler)
from daprune.cli import main
sys.exit(main({argv!r}))
"""


@pytest.mark.parametrize("sig,code", [("SIGTERM", 143), ("SIGINT", 130)])
def test_signal_stops_cleanly_and_the_next_run_resumes(capsys, tmp_path, sig, code):
    src = save_model(tiny_model(layers=4), tmp_path / "model", tokenizer=False)
    out = tmp_path / "out"
    argv = ["prune", "--model", str(src), "--out", str(out), *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.run([sys.executable, "-c", _CHILD.format(sig=sig, argv=argv)], env=env, capture_output=True,
                          text=True, timeout=240)
    assert proc.returncode == code, proc.stderr[-3000:]
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines == [f"daprune: interrupted by {sig}; the work folder {out}.daprune-work is kept: run the same "
                     "command again to resume"], proc.stderr[-3000:]
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith(".out.")]
    assert json.loads((tmp_path / "out.daprune-work" / "state.json").read_text())["next_block"] == 2
    previous = signal.getsignal(signal.SIGTERM)
    assert main(argv) == 0
    assert json.loads((out / "report.json").read_text())["execution"]["resumed_from_block"] == 2
    assert signal.getsignal(signal.SIGTERM) is previous  # main() puts the SIGTERM handler back


def test_subprocess_refusal_is_exactly_one_line_on_the_real_stderr(tmp_path, pristine):
    """In-process capture could miss library output written straight to the process's stderr; this cannot."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "daprune.cli", "prune", "--model", str(pristine), "--out", str(out), *FAST,
           "--seqlen", "100000"]
    proc = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 2
    assert one_error_line(proc.stderr) == (
        f"daprune: error: --seqlen 100000 is longer than the model's context: {pristine}'s config.json has "
        "max_position_embeddings = 256; use --seqlen 256 or less")
    assert not out.exists()
