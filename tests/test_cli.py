"""Bad input: a clear message, exit code 2, and no output folder (nor temp leftovers)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_streaming import save_model


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A tiny random Llama with an offline word tokenizer: CLI runs in seconds, no optional packages needed."""
    return save_model(tiny_model(layers=6), tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def nan_folder(tiny_folder, tmp_path_factory) -> Path:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = tmp_path_factory.mktemp("nan") / "model"
    model = AutoModelForCausalLM.from_pretrained(tiny_folder)
    with torch.no_grad():
        model.model.layers[2].mlp.down_proj.weight[0, 0] = float("nan")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_folder).save_pretrained(folder)
    return folder


@dataclass
class Result:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process (a subprocess per case costs ~10 s of imports)."""
    from daprune.cli import main

    def run(*args: str, cwd: Path) -> Result:
        capsys.readouterr()
        code = main(list(args))
        out, err = capsys.readouterr()
        return Result(code, out, err)

    return run


def test_exit_code_in_a_real_process(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "daprune.cli", "prune", "--out", str(out), "--sparsity", "2"],
                          capture_output=True, text=True, timeout=300, env={**os.environ})
    _assert_refused(proc, out, "--sparsity must be in [0, 1)")


def _assert_refused(proc, out: Path, needle: str):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert needle in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()
    assert not out.with_name(f"{out.name}.daprune-work").exists()  # no resume work folder left behind
    assert not [p for p in out.parent.iterdir() if p.name.startswith((f".{out.name}", f"{out.name}."))]


@pytest.mark.parametrize("args,needle", [
    (["--sparsity", "1.0"], "--sparsity must be in [0, 1)"),
    (["--sparsity", "-0.1"], "--sparsity must be in [0, 1)"),
    (["--layers", "3:3"], "selects no block"),
    (["--layers", "abc"], "START:STOP"),
    (["--sparsity", "0.9", "--layers", "1:2"], "cannot be met"),
    (["--nsamples", "1", "--seqlen", "8"], "fewer than the hidden size"),
    (["--calibration", "/nonexistent/calib.txt"], "calibration file not found"),
])
def test_bad_settings(run_cli, tiny_folder, tmp_path, args, needle):
    out = tmp_path / "out"
    proc = run_cli("prune", "--model", str(tiny_folder), "--out", str(out), "--layers", "1:-1",
                   "--sparsity", "0.01", "--quiet", "--calibration", "random", *args, cwd=tmp_path)
    _assert_refused(proc, out, needle)


def test_missing_model(run_cli, tmp_path):
    out = tmp_path / "out"
    _assert_refused(run_cli("prune", "--model", "./no/such/model", "--out", str(out), cwd=tmp_path), out,
                    "model path not found")


def test_unknown_architecture(run_cli, tmp_path):
    from transformers import BloomConfig

    folder = tmp_path / "bloom"
    BloomConfig(n_layer=2, hidden_size=32, n_head=2).save_pretrained(folder)
    out = tmp_path / "out"
    _assert_refused(run_cli("prune", "--model", str(folder), "--out", str(out), cwd=tmp_path), out,
                    "unsupported architecture 'bloom'; daprune supports: gemma, gemma2, gemma3_text, gpt2")


def test_non_finite_activations(run_cli, nan_folder, tmp_path):
    out = tmp_path / "out"
    proc = run_cli("prune", "--model", str(nan_folder), "--out", str(out), "--layers", "1:-1", "--quiet",
                   "--sparsity", "0.01", "--calibration", "random", cwd=tmp_path)
    _assert_refused(proc, out, "non-finite")


def test_existing_output_refused_then_overwrite(run_cli, tiny_folder, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    proc = run_cli("prune", "--model", str(tiny_folder), "--out", str(out), "--quiet", cwd=tmp_path)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "keep.txt").exists()
    proc = run_cli("prune", "--model", str(tiny_folder), "--out", str(out), "--layers", "1:-1", "--overwrite",
                   "--quiet", "--sparsity", "0.01", "--calibration", "random", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / "keep.txt").exists()
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["sparsity"] == 0.01 and report["params"]["achieved_sparsity"] >= 0.01
    assert "block" in proc.stdout and "parameters" in proc.stdout


def test_eval_writes_json(run_cli, tiny_folder, data_dir, tmp_path):
    out = tmp_path / "eval.json"
    res = run_cli("eval", "--model", str(tiny_folder), "--ppl", "wikitext2,ptb", "--max-windows", "2",
                  "--data-dir", data_dir, "--json", str(out), "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    data = json.loads(out.read_text())
    assert set(data["ppl"]) == {"wikitext2", "ptb"}
    assert all(v > 1.0 for v in data["ppl"].values())
    assert data["ppl_details"]["ptb"]["windows"] == 2
    assert "ppl wikitext2" in res.stdout
