"""Bad input found on disk: each case a DapruneError with its own message, exit code 2, nothing half-written.

Covers what the settings checks in test_cli.py cannot see: corrupt/truncated weights, weights that do
not fit the config, unusable tokenizers, degenerate Gram matrices, unwritable outputs, absent devices.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer, tiny_model
from test_streaming import save_model, word_tokenizer

from daprune.cli import main

FAST = ["--calibration", "random", "--nsamples", "8", "--seqlen", "24", "--layers", "1:-1", "--sparsity", "0.2",
        "--quiet"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Path:
    return save_model(tiny_model(layers=4), tmp_path_factory.mktemp("bad") / "model")


@pytest.fixture
def model_dir(pristine, tmp_path) -> Path:
    """A fresh copy of a good tiny model folder (with a tokenizer), for each test to break."""
    return Path(shutil.copytree(pristine, tmp_path / "model"))


def run(capsys, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["prune", *args])
    return code, capsys.readouterr().err


def refused(capsys, out: Path, needle: str, *args: str) -> str:
    code, err = run(capsys, "--out", str(out), *args)
    assert code == 2, err[-2000:]
    assert needle in err, err[-2000:]
    assert "Traceback" not in err
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith((f".{out.name}", f"{out.name}."))]
    assert not leftovers, leftovers  # no temp folder, no work folder
    return err


@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming"])
def test_truncated_safetensors(capsys, model_dir, tmp_path, streaming):
    f = model_dir / "model.safetensors"
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    refused(capsys, tmp_path / "out", "truncated, corrupt or not safetensors", "--model", str(model_dir), streaming,
            *FAST)


def test_not_a_safetensors_file(capsys, model_dir, tmp_path):
    (model_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{garbage header}" * 4)
    refused(capsys, tmp_path / "out", "cannot read weights file", "--model", str(model_dir), *FAST)


def test_index_names_a_missing_shard(capsys, tmp_path):
    folder = save_model(tiny_model(layers=4), tmp_path / "model", shard="60KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    shards[1].unlink()
    refused(capsys, tmp_path / "out", f"names shard(s) that do not exist: {shards[1].name}", "--model", str(folder),
            *FAST)


def test_missing_tensor(capsys, model_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    f = model_dir / "model.safetensors"
    state = load_file(str(f))
    del state["model.layers.2.mlp.up_proj.weight"]
    save_file(state, str(f), metadata={"format": "pt"})
    err = refused(capsys, tmp_path / "out", "do not match its config.json: 1 tensor(s) missing",
                  "--model", str(model_dir), *FAST)
    assert "model.layers.2.mlp.up_proj.weight" in err


@pytest.mark.parametrize("streaming", ["--streaming", "--no-streaming"])
def test_config_shape_mismatch(capsys, model_dir, tmp_path, streaming):
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg["intermediate_size"] = 80  # the weights are 96 wide
    (model_dir / "config.json").write_text(json.dumps(cfg))
    err = refused(capsys, tmp_path / "out", "of the wrong shape", "--model", str(model_dir), streaming, *FAST)
    assert "is [96, 48] in the file but the config implies [80, 48]" in err


def test_text_calibration_without_tokenizer(capsys, tmp_path):
    folder = save_model(tiny_model(layers=4), tmp_path / "model", tokenizer=False)
    text = tmp_path / "calib.txt"
    text.write_text("w5 w6 " * 400)
    args = [a if a != "random" else str(text) for a in FAST]
    refused(capsys, tmp_path / "out", "needs a tokenizer, but the model folder has none", "--model", str(folder),
            *args)


@pytest.mark.parametrize("words,needle", [
    (100, "calibration text has 100 tokens, fewer than nsamples*seqlen = 192"),  # 8 x 24 asked
    (10, "calibration text has 10 tokens; need at least 25"),  # not even one window of 24 (+1)
])
def test_calibration_text_shorter_than_requested(capsys, model_dir, tmp_path, words, needle):
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{3 + i % 100}" for i in range(words)))
    args = [a if a != "random" else str(text) for a in FAST]
    refused(capsys, tmp_path / "out", needle, "--model", str(model_dir), *args)


def test_tokenizer_bigger_than_model_vocabulary(capsys, model_dir, tmp_path):
    word_tokenizer(300).save_pretrained(model_dir)  # ids up to 299; the model has 128 embeddings
    text = tmp_path / "calib.txt"
    text.write_text(" ".join(f"w{200 + i % 90}" for i in range(600)))
    args = [a if a != "random" else str(text) for a in FAST]
    refused(capsys, tmp_path / "out", "vocabulary has 128 entries: tokenizer and model do not belong together",
            "--model", str(model_dir), *args)


def test_unreadable_tokenizer(capsys, model_dir, tmp_path):
    (model_dir / "tokenizer.json").write_text("{broken")
    refused(capsys, tmp_path / "out", "cannot load the tokenizer", "--model", str(model_dir), *FAST)


def test_self_generation_without_special_tokens_falls_back(capsys, model_dir, tmp_path):
    """No BOS, EOS or pad token: self-generation still works (random first token, no padding needed)."""
    word_tokenizer(128, bos=False, eos=False, pad=False).save_pretrained(model_dir)
    out = tmp_path / "out"
    args = [{"random": "self", "8": "2"}.get(a, a) for a in FAST]  # 2 x 24 tokens: generation is the slow part
    code, err = run(capsys, "--model", str(model_dir), "--out", str(out), *args)
    assert code == 0, err[-2000:]
    calib = json.loads((out / "report.json").read_text())["calibration"]
    assert calib["kind"] == "self-generated" and "no BOS" in calib["sampling"]["prompt"]


def test_non_positive_definite_gram_escalates_damping_and_is_reported():
    """64 tokens for a 96-wide FFN: down_proj's input Gram is singular; a tiny ridge cannot fix it."""
    from daprune.api import prune

    res = prune(model=tiny_model(layers=3), tokenizer=CharTokenizer(), calibration="random", nsamples=4, seqlen=16,
                layers="0:", recovery="paper", recovery_damp=1e-12, progress=False)
    for row in res.report["layers"]:
        down = row["damping"]["down"]
        assert down["escalations"] > 0 and down["damp"] > 1e-12
        assert row["damping"]["gate_up"]["escalations"] == 0  # 64 tokens >= 48 inputs: not singular
    assert all(torch.isfinite(p).all() for p in res.model.parameters())


def test_output_under_a_file(capsys, model_dir, tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    code, err = run(capsys, "--model", str(model_dir), "--out", str(blocker / "out"), *FAST)
    assert code == 2 and "is a file, not a folder" in err and "Traceback" not in err
    assert blocker.read_text() == "x"


def test_unwritable_output_location(capsys, model_dir):
    out = Path("/proc/daprune-test-out")  # not writable, even for root
    code, err = run(capsys, "--model", str(model_dir), "--out", str(out), *FAST)
    assert code == 2 and "cannot write" in err and "Traceback" not in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_requested_without_gpu(capsys, model_dir, tmp_path):
    refused(capsys, tmp_path / "out", "no CUDA device is visible", "--model", str(model_dir), "--device", "cuda",
            *FAST)


def test_streaming_requested_for_pickle_weights(capsys, tmp_path):
    folder = tmp_path / "model"
    model = tiny_model(layers=2)
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")
    word_tokenizer().save_pretrained(folder)
    refused(capsys, tmp_path / "out", "--streaming is not possible here: the model source has no local safetensors",
            "--model", str(folder), "--streaming", *FAST)


def test_recovery_nsamples_needs_recovery_and_at_least_the_scoring_samples():
    """Extra re-fit samples without a re-fit, or fewer than the scoring samples, would be recorded but change
    nothing: both are refused before any work."""
    from daprune.config import PruneConfig
    from daprune.errors import ConfigError

    with pytest.raises(ConfigError, match="only matters with recovery"):
        PruneConfig(recovery="none", recovery_nsamples=128).validate()
    with pytest.raises(ConfigError, match="must be >= --nsamples"):
        PruneConfig(recovery="paper", nsamples=32, recovery_nsamples=16).validate()
    PruneConfig(recovery="paper", nsamples=16, recovery_nsamples=128).validate()
