"""Self-generated calibration's sampling settings (--self-temperature, --self-top-p): each changes the text the
model writes for itself, is recorded in report.json, and is refused where it would change nothing."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import tiny_model
from test_streaming import save_model, word_tokenizer

from daprune.cli import main
from daprune.config import PruneConfig
from daprune.data.calibration import self_generated
from daprune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

SEED, N, SEQLEN = 3, 4, 12


@pytest.fixture(scope="module")
def model():
    return tiny_model(layers=2)


@pytest.fixture(scope="module")
def tok():
    return word_tokenizer(128)


def _prompts(vocab: int, bos: int) -> torch.Tensor:
    """The prompts self_generated documents: BOS, then one uniform random token from a generator seeded by the seed."""
    first = torch.randint(0, vocab, (N, 1), generator=torch.Generator().manual_seed(SEED))
    return torch.cat([torch.full((N, 1), bos), first], 1)


def test_top_p_near_zero_is_greedy_decoding(model, tok):
    """A nucleus that holds only the most likely token turns sampling into greedy decoding: the rows must equal
    what a plain greedy forward-and-argmax loop writes from the same prompts."""
    got = self_generated(model, tok, N, SEQLEN, SEED, top_p=1e-9, batch_size=N, progress=False)
    ids = _prompts(model.config.vocab_size, tok.bos_token_id)
    with torch.no_grad():
        while ids.shape[1] < SEQLEN:
            nxt = model(ids).logits[:, -1].argmax(-1, keepdim=True)
            ids = torch.cat([ids, nxt], 1)
    assert torch.equal(got, ids)


def test_default_sampling_is_not_greedy_and_temperature_changes_the_text(model, tok):
    greedy = self_generated(model, tok, N, SEQLEN, SEED, top_p=1e-9, batch_size=N, progress=False)
    default = self_generated(model, tok, N, SEQLEN, SEED, batch_size=N, progress=False)
    again = self_generated(model, tok, N, SEQLEN, SEED, batch_size=N, progress=False)
    hot = self_generated(model, tok, N, SEQLEN, SEED, temperature=3.0, batch_size=N, progress=False)
    assert torch.equal(default, again)  # the seed makes it reproducible
    assert not torch.equal(default[:, 2:], greedy[:, 2:])
    assert not torch.equal(default[:, 2:], hot[:, 2:])


@pytest.mark.parametrize(("self_gen", "needle"), [
    ({"temperature": 0.0}, "--self-temperature must be"),
    ({"temperature": math.nan}, "--self-temperature must be"),
    ({"top_p": 0.0}, "--self-top-p must be"),
    ({"top_p": 1.5}, "--self-top-p must be"),
    ({"max_new_tokens": 64}, "do not exist"),
])
def test_bad_sampling_settings_are_refused(self_gen, needle):
    with pytest.raises(ConfigError, match=needle):
        PruneConfig(calibration="self", self_gen={**PruneConfig().self_gen, **self_gen}).validate()


@pytest.mark.parametrize("calibration", ["self", "lambada+self"])
def test_sampling_settings_accepted_where_text_is_generated(calibration):
    PruneConfig(calibration=calibration, self_gen={"temperature": 0.7, "top_p": 0.9}).validate()
    PruneConfig(calibration="lambada", heldout_nsamples=4, heldout_calibration="self",
                self_gen={"temperature": 0.7, "top_p": 0.9}).validate()


def test_sampling_settings_without_self_generation_are_refused(capsys, tmp_path):
    """A sampling setting with book-text calibration would be silently ignored: refused before any loading."""
    out = tmp_path / "out"
    code = main(["prune", "--out", str(out), "--calibration", "lambada", "--self-top-p", "0.5", "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and "generates none" in err and "Traceback" not in err
    assert not out.exists()


def test_report_records_the_sampling_used(model, capsys, tmp_path):
    src = save_model(tiny_model(layers=3), tmp_path / "src")
    out = tmp_path / "out"
    code = main(["prune", "--model", str(src), "--out", str(out), "--calibration", "self", "--nsamples", "4",
                 "--seqlen", "16", "--layers", "1:-1", "--sparsity", "0.2", "--self-temperature", "0.7",
                 "--self-top-p", "0.8", "--quiet"])
    assert code == 0, capsys.readouterr().err[-2000:]
    report = json.loads(Path(out / "report.json").read_text())
    assert report["calibration"]["sampling"]["temperature"] == 0.7
    assert report["calibration"]["sampling"]["top_p"] == 0.8
    assert report["settings"]["self_gen"] == {"temperature": 0.7, "top_p": 0.8}


# -- the cache of self-generated rows (data/generated.py) -------------------------------------------------------
SG = dict(calibration="self", nsamples=4, seqlen=16, layers="1:-1", sparsity=0.2, progress=False)


@pytest.fixture
def src(tmp_path) -> Path:
    return save_model(tiny_model(layers=3), tmp_path / "src")


def _no_generation(*_a, **_k):
    raise AssertionError("generated again although the rows are in the cache")


def _weights(result) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in result.model.state_dict().items()}


@pytest.mark.parametrize("streaming", [False, True])
def test_second_run_reads_the_generated_rows_back(src, tmp_path, monkeypatch, caplog, streaming):
    from daprune.api import prune

    cache = tmp_path / "cache"
    first = prune(model=str(src), out=str(tmp_path / "a"), cache=str(cache), streaming=streaming, **SG)
    assert "reused_from_cache" not in first.report["calibration"]
    assert len(list((cache / "self-generated").glob("*.safetensors"))) == 1
    monkeypatch.setattr("daprune.data.calibration.self_generated", _no_generation)
    caplog.clear()
    second = prune(model=str(src), out=str(tmp_path / "b"), cache=str(cache), streaming=streaming, **SG)
    assert "reused_from_cache" in second.report["calibration"]
    assert "loads the whole model" not in caplog.text  # streaming: nothing to generate, so no full load
    a, b = _weights(first), _weights(second)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("change", [{"seed": 1}, {"nsamples": 5}, {"self_gen": {"temperature": 0.5, "top_p": 0.95}},
                                    {"dtype": "bfloat16"}])
def test_any_setting_that_changes_the_text_generates_anew(src, tmp_path, monkeypatch, change):
    from daprune.api import prune

    cache = tmp_path / "cache"
    prune(model=str(src), cache=str(cache), **SG)
    monkeypatch.setattr("daprune.data.calibration.self_generated", _no_generation)
    with pytest.raises(AssertionError, match="generated again"):
        prune(model=str(src), cache=str(cache), **{**SG, **change})


def test_rewritten_weights_generate_anew(src, tmp_path, monkeypatch):
    from daprune.api import prune

    cache = tmp_path / "cache"
    prune(model=str(src), cache=str(cache), **SG)
    save_model(tiny_model(layers=3, seed=1), src)  # new weights in the same folder
    monkeypatch.setattr("daprune.data.calibration.self_generated", _no_generation)
    with pytest.raises(AssertionError, match="generated again"):
        prune(model=str(src), cache=str(cache), **SG)


def test_damaged_entry_is_regenerated_not_trusted(src, tmp_path):
    from daprune.api import prune

    cache = tmp_path / "cache"
    first = prune(model=str(src), cache=str(cache), **SG)
    (entry,) = (cache / "self-generated").glob("*.safetensors")
    entry.write_bytes(entry.read_bytes()[:40])
    second = prune(model=str(src), cache=str(cache), **SG)
    assert "reused_from_cache" not in second.report["calibration"]
    a, b = _weights(first), _weights(second)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_store_ignores_an_entry_written_for_another_key(tmp_path):
    from daprune.data.generated import GeneratedStore

    store = GeneratedStore(tmp_path, {"source": "x"})
    ids = torch.arange(6).reshape(2, 3)
    store.save(ids, 2, 3, 0, {"temperature": 1.0})
    assert torch.equal(store.load(2, 3, 0, {"temperature": 1.0}), ids)
    other = store.path(store.key(2, 3, 0, {"temperature": 1.0}))
    key_b = store.key(2, 3, 1, {"temperature": 1.0})
    other.rename(store.path(key_b))  # right file name, wrong key inside
    assert store.load(2, 3, 1, {"temperature": 1.0}) is None


def test_model_passed_in_memory_uses_the_callers_store(tmp_path, monkeypatch):
    """daprune compare loads each row's model itself and passes one store, so its rows generate once."""
    from daprune.api import prune
    from daprune.data.generated import GeneratedStore

    store = GeneratedStore(tmp_path / "gen", {"source": "test"})
    tok = word_tokenizer(128)
    prune(model=tiny_model(layers=3), tokenizer=tok, generated=store, **SG)
    monkeypatch.setattr("daprune.data.calibration.self_generated", _no_generation)
    again = prune(model=tiny_model(layers=3), tokenizer=tok, generated=store, **SG)
    assert "reused_from_cache" in again.report["calibration"]
    with pytest.raises(AssertionError, match="generated again"):  # no store: nothing to read back
        prune(model=tiny_model(layers=3), tokenizer=tok, **SG)


def test_a_new_tokenizer_or_generation_config_generates_anew(src, tmp_path, monkeypatch):
    """The special ids and the EOS that generation suppresses are part of what the model writes."""
    from daprune.api import prune

    cache = tmp_path / "cache"
    prune(model=str(src), cache=str(cache), **SG)
    gen = src / "generation_config.json"
    gen.write_text(gen.read_text().replace('"eos_token_id": 2', '"eos_token_id": 5'))
    assert '"eos_token_id": 5' in gen.read_text()
    monkeypatch.setattr("daprune.data.calibration.self_generated", _no_generation)
    with pytest.raises(AssertionError, match="generated again"):
        prune(model=str(src), cache=str(cache), **SG)
