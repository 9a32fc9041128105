"""Refusals that must come before any work: a bad evaluation request costs no prune and no model load, and
parsing a command line (``--help``, a usage error) imports none of torch, transformers or gguf."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import _assert_refused, run_cli, tiny_folder  # noqa: F401  (fixtures)


@pytest.fixture
def no_work(monkeypatch):
    """Make every expensive entry point fail the test if it is reached."""
    import daprune.api
    import daprune.models.loading

    def reached(*_args, **_kwargs):
        raise AssertionError("expensive work started before the refusal")

    monkeypatch.setattr(daprune.api, "prune", reached)
    monkeypatch.setattr(daprune.models.loading, "load_model", reached)


def test_parsing_imports_no_heavy_library():
    code = ("import sys; from daprune.cli import parse_args\n"
            "for argv in (['prune', '--out', 'x', '--preset', 'quality'], ['eval', '--ppl', 'ptb'],\n"
            "             ['compare'], ['bench', '--model', 'm'], ['export', 'f', '--gguf', 'g']):\n"
            "    parse_args(argv)\n"
            "print(sorted(m for m in ('torch', 'transformers', 'gguf', 'lm_eval') if m in sys.modules))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "-m", "daprune.cli", "--help"], capture_output=True, text=True,
                            timeout=120)
    assert helped.returncode == 0 and "prune" in helped.stdout and "export" in helped.stdout


@pytest.mark.parametrize("args,needle", [
    (["--eval", "wikitext9"], "unknown perplexity corpus wikitext9"),
    (["--eval", "ptb", "--data-dir", "/no/such/data"], "ptb.valid.txt not found"),
    (["--eval", "wikitext2", "--max-windows", "0"], "--max-windows must be >= 1"),
    (["--max-windows", "8"], "pass --eval CORPORA too"),
])
def test_prune_refuses_bad_eval_before_pruning(run_cli, no_work, tmp_path, args, needle):  # noqa: F811
    out = tmp_path / "out"
    _assert_refused(run_cli("prune", "--out", str(out), "--quiet", *args, cwd=tmp_path), out, needle)


@pytest.mark.parametrize("args,needle", [
    (["--tasks", "piqa,mmlu"], "unknown task(s): mmlu"),
    (["--tasks", "piqa", "--limit", "0"], "limit must be a positive number"),
    (["--ppl", "wikitext2", "--limit", "5"], "--limit applies only to zero-shot tasks"),
    (["--ppl", "wikitext2", "--limit", "5", "--request-cache", "CACHE"], "--limit and --request-cache apply only"),
    (["--tasks", "piqa", "--max-windows", "5"], "pass --ppl CORPORA too"),
    (["--ppl", "wikitext2,wikitext9"], "unknown perplexity corpus wikitext9"),
    (["--ppl", "wikitext2", "--batch-size", "0"], "--batch-size must be >= 1"),
])
def test_eval_refuses_before_loading(run_cli, no_work, tmp_path, args, needle):  # noqa: F811
    cache = tmp_path / "cache"
    res = run_cli("eval", "--quiet", *[str(cache) if a == "CACHE" else a for a in args], cwd=tmp_path)
    assert res.returncode == 2, res.stderr[-2000:]
    assert needle in res.stderr and "Traceback" not in res.stderr
    assert not cache.exists()  # a refused --request-cache folder is not created


def test_compare_refuses_bad_corpus_before_any_row(run_cli, no_work, tmp_path):  # noqa: F811
    out = tmp_path / "table.json"
    res = run_cli("compare", "--ppl", "wikitext2,ptb9", "--json", str(out), "--quiet", cwd=tmp_path)
    assert res.returncode == 2 and "unknown perplexity corpus ptb9" in res.stderr
    assert not out.exists()


def test_eval_checks_do_not_refuse_a_good_request(run_cli, tiny_folder, tmp_path):  # noqa: F811
    """The corpora check reads the packaged held-out passages the evaluation then scores (no data folder)."""
    res = run_cli("eval", "--model", str(tiny_folder), "--ppl", "lambada-heldout", "--max-windows", "2",
                  "--quiet", cwd=tmp_path)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "ppl lambada-heldout" in res.stdout


def test_bench_and_export_refuse_before_loading(run_cli, tmp_path):  # noqa: F811
    res = run_cli("bench", "--model", str(tmp_path / "none"), "--repeats", "0", cwd=tmp_path)
    assert res.returncode == 2 and "--repeats and --seq-len must be >= 1" in res.stderr
    res = run_cli("bench", "--model", str(tmp_path), "--threads", "0", cwd=tmp_path)
    assert res.returncode == 2 and "--threads must be >= 1" in res.stderr
    gguf = tmp_path / "m.gguf"
    res = run_cli("export", str(tmp_path / "none"), "--gguf", str(gguf), cwd=tmp_path)
    assert res.returncode == 2 and "is not a folder" in res.stderr and not gguf.exists()


def test_export_choices_are_the_writers_types():
    pytest.importorskip("gguf")
    from daprune.export.arch import OUTTYPE_NAMES
    from daprune.export.gguf_writer import OUTTYPES

    assert tuple(OUTTYPES) == OUTTYPE_NAMES


def test_library_errors_stay_value_errors():
    """ConfigError is also a ValueError: callers of evaluate_zeroshot that caught ValueError still do."""
    from daprune.errors import ConfigError, DapruneError
    from daprune.evaluation.zeroshot import parse_tasks

    with pytest.raises(ValueError, match="unknown task") as info:
        parse_tasks("nope")
    assert isinstance(info.value, ConfigError) and isinstance(info.value, DapruneError)


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory) -> dict[str, Path]:
    from conftest import tiny_model
    from test_export_gguf import bpe_tokenizer

    def save_model(model, folder: Path, tokenizer=None) -> Path:  # with a tokenizer llama.cpp can split alike
        model.save_pretrained(folder)
        (tokenizer or bpe_tokenizer(model.config.vocab_size, pad=True)).save_pretrained(folder)
        return folder

    root = tmp_path_factory.mktemp("families")
    folders = {arch: save_model(tiny_model(arch, layers=8), root / arch) for arch in ("qwen2", "gpt2", "llama",
                                                                                       "qwen3", "mistral")}
    # a byte-level BPE tokenizer under a pre-tokenizer llama.cpp has no name for
    folders["llama-word-split"] = save_model(tiny_model("llama", layers=8), root / "llama-word-split",
                                             bpe_tokenizer(128, pre="whitespace"))
    # a Qwen3 whose config states o_proj biases (attention_bias), as a FLAP-compensated Qwen3 output has: nonzero
    # ones llama.cpp's qwen3 graph cannot read, and the same with the o_proj biases all zero
    import torch
    from test_families import tiny

    flagged = tiny("qwen3", layers=8, attention_bias=True)
    folders["qwen3-flagged"] = save_model(flagged, root / "qwen3-flagged")
    with torch.no_grad():
        for layer in flagged.model.layers:
            layer.self_attn.o_proj.bias.zero_()
    folders["qwen3-flagged-zero"] = save_model(flagged, root / "qwen3-flagged-zero")
    biased = save_model(tiny_model("qwen3", layers=8), root / "qwen3-extra-biases")  # a FLAP output as the source
    config = json.loads((biased / "config.json").read_text())
    config["daprune_extra_biases"] = ["mlp.down_proj"]
    (biased / "config.json").write_text(json.dumps(config))
    scaled = save_model(tiny_model("llama", layers=8), root / "llama-rope-scaled")  # Llama-3.x-style RoPE scaling
    config = json.loads((scaled / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                              "original_max_position_embeddings": 64, "rope_theta": 10000.0}
    (scaled / "config.json").write_text(json.dumps(config))
    return {**folders, "llama-rope-scaled": scaled, "qwen3-extra-biases": biased}


@pytest.mark.parametrize("arch,extra,needle", [
    ("qwen3", [], "add --layout uniform"),  # the paper's 4:-2 leaves blocks whole
    ("qwen3", ["--layers", "0:", "--schedule", "owl"], "add --layout uniform"),  # a per-block schedule
    ("qwen3", ["--layers", "0:"], "add --layout uniform"),  # the default split is chosen per block
    ("gpt2", ["--layout", "uniform"], "no GGUF export for model type 'gpt2'"),
    ("llama-rope-scaled", [], "RoPE scaling 'llama3' is not supported"),
    # llama.cpp's qwen3 graph reads no o_proj / down_proj bias
    ("qwen3", ["--layout", "uniform", "--compensate-mean"], "may add biases to o_proj and down_proj"),
    ("qwen3", ["--layout", "uniform", "--ffn-criterion", "flap", "--selection", "score", "--head-criterion", "none"],
     "may add biases to down_proj"),
    ("qwen3-extra-biases", ["--layout", "uniform"], "the source carries down_proj biases"),
    ("qwen3-flagged", ["--layout", "uniform"], "the source's model.layers.0.self_attn.o_proj.bias is a nonzero bias"),
    ("llama-word-split", [], "--gguf: tokenizer.json's pre-tokenizer 'Whitespace' has no llama.cpp counterpart"),
    # Qwen3's config states an o_proj bias (attention_bias), but llama.cpp's qwen3 graph reads none
    ("qwen3", ["--layout", "uniform", "--head-criterion", "flap"], "o_proj (--compensate-mean or the flap "
     "criterion), which llama.cpp's qwen3 graph does not read"),
    ("qwen3", ["--layout", "uniform", "--compensate-mean", "--head-criterion", "none"],
     "may add biases to down_proj (--compensate-mean"),
])
def test_prune_gguf_refused_before_pruning(run_cli, no_work, family_folders, tmp_path, arch, extra,  # noqa: F811
                                           needle):
    out, gguf = tmp_path / "out", tmp_path / "m.gguf"
    res = run_cli("prune", "--model", str(family_folders[arch]), "--out", str(out), "--gguf", str(gguf),
                  "--sparsity", "0.1", "--quiet", *extra, cwd=tmp_path)
    _assert_refused(res, out, needle)
    assert not gguf.exists()


@pytest.mark.parametrize("folder, needle, steps", [
    ("qwen3-flagged", "the source's model.layers.0.self_attn.o_proj.bias is a nonzero bias", 2),
    ("llama-word-split", "'Whitespace' has no llama.cpp counterpart", 1),  # refused before the weights come down
    ("gpt2", "no GGUF export for model type 'gpt2'", 1),
])
def test_prune_gguf_checks_a_hub_models_files_before_pruning(run_cli, no_work, family_folders, tmp_path,  # noqa: F811
                                                               monkeypatch, folder, needle, steps):
    """A hub id's config and tokenizer files are downloaded for the check, and its weights (for the bias check) only
    once those pass: the files the prune's from_pretrained reads, by exact name (no pattern reaches a repo's
    original/ or checkpoint folders). Here the download is a stand-in that returns a local folder."""
    import huggingface_hub

    from daprune.models.loading import HUB_CONFIG_FILES

    asked = []

    def download(repo_id, allow_patterns=None):
        asked.append((repo_id, allow_patterns))
        assert not any(c in name for name in allow_patterns for c in "*?[/")  # exact top-level names only
        return str(family_folders[folder])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", download)
    out = tmp_path / "out"
    res = run_cli("prune", "--model", f"someorg/{folder}", "--out", str(out), "--gguf", str(tmp_path / "m.gguf"),
                  "--layout", "uniform", "--sparsity", "0.1", "--quiet", cwd=tmp_path)
    _assert_refused(res, out, needle)
    assert asked == [(f"someorg/{folder}", HUB_CONFIG_FILES), (f"someorg/{folder}", ["model.safetensors"])][:steps]


def test_hub_weight_files_are_the_indexed_shards(tmp_path):
    from daprune.models.loading import hub_weight_files

    assert hub_weight_files(tmp_path) == ["model.safetensors"]
    first, second = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    index = {"weight_map": {"a.weight": second, "b.weight": first, "c.weight": first}}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    assert hub_weight_files(tmp_path) == [first, second]


def test_prune_gguf_hub_download_failure_is_one_line(run_cli, no_work, tmp_path, monkeypatch):  # noqa: F811
    import huggingface_hub

    def offline(*_args, **_kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    out = tmp_path / "out"
    res = run_cli("prune", "--model", "someorg/model", "--out", str(out), "--gguf", str(tmp_path / "m.gguf"),
                  "--quiet", cwd=tmp_path)
    _assert_refused(res, out, "cannot download someorg/model from the Hugging Face hub: no network")


def test_prune_gguf_checks_the_tokenizer_the_prune_saves(run_cli, no_work, tmp_path, monkeypatch):  # noqa: F811
    """The export reads the tokenizer the prune saves, which transformers may change between loading and saving
    (here a stand-in adds a token on saving, as Qwen2Tokenizer adds a pad token when it loads a tiny tokenizer): the
    check sees what will be saved."""
    import transformers
    from conftest import tiny_model
    from test_export_gguf import bpe_tokenizer

    folder = tmp_path / "src"
    tiny_model("llama", layers=8).save_pretrained(folder)
    bpe_tokenizer(128).save_pretrained(folder)
    saving = transformers.PreTrainedTokenizerFast.save_pretrained

    def save_with_a_token(self, *args, **kwargs):
        self.add_special_tokens({"pad_token": "<pad>"})  # 129 tokens for 128 embedding rows
        return saving(self, *args, **kwargs)

    monkeypatch.setattr(transformers.PreTrainedTokenizerFast, "save_pretrained", save_with_a_token)
    out = tmp_path / "out"
    res = run_cli("prune", "--model", str(folder), "--out", str(out), "--gguf", str(tmp_path / "m.gguf"),
                  "--sparsity", "0.1", "--quiet", cwd=tmp_path)
    _assert_refused(res, out, "has 129 tokens and the embedding 128 rows")


@pytest.mark.parametrize("arch,extra", [
    ("qwen2", ["--layout", "uniform"]),
    ("qwen2", ["--layers", "0:", "--head-split", "ffn-only"]),  # per-layer layout, yet every block alike
    ("qwen2", ["--layers", "0:", "--head-split", "paper"]),
    ("qwen2", []),  # per-layer Qwen2 goes to llama.cpp's deci graph (Llama with q/k/v biases)
    ("qwen2", ["--layout", "uniform", "--compensate-mean"]),  # written as llama, whose graph reads the biases
    ("qwen3", ["--layers", "0:", "--head-split", "ffn-only"]),  # per-layer layout, yet every block alike
    ("llama", []),  # llama.cpp's deci graph takes per-layer widths
    ("llama", ["--compensate-mean"]),  # Llama's config states o_proj / down_proj biases (attention_bias, mlp_bias)
    ("qwen3", ["--layout", "uniform"]),  # no compensation: nothing llama.cpp's qwen3 graph cannot read
    ("qwen3-flagged-zero", ["--layout", "uniform"]),  # its o_proj biases are zero: left out of the GGUF
    ("mistral", ["--compensate-mean"]),  # biases outside Mistral's config, but llama.cpp's deci graph reads them
    ("gpt2", []),  # no --gguf: nothing to check
])
def test_prune_exportable_or_without_gguf_goes_on(run_cli, no_work, family_folders, tmp_path, arch,  # noqa: F811
                                                  extra):
    """The check refuses only what the export must: these reach the prune (here the stand-in that marks
    expensive work)."""
    gguf = ["--gguf", str(tmp_path / "m.gguf")] if arch != "gpt2" else []
    with pytest.raises(AssertionError, match="expensive work started"):
        run_cli("prune", "--model", str(family_folders[arch]), "--out", str(tmp_path / "out"), "--sparsity", "0.1",
                "--quiet", *gguf, *extra, cwd=tmp_path)


def test_compare_tau_without_a_similarity_row_refused(run_cli, no_work, tmp_path):  # noqa: F811
    res = run_cli("compare", "--rows", "dense,wanda-sp,flap", "--tau", "0.1", "--quiet", cwd=tmp_path)
    assert res.returncode == 2 and "no selected row judges heads that way" in res.stderr


def test_compare_zero_shot_only_is_not_refused(run_cli, no_work, tmp_path):  # noqa: F811
    """``compare --ppl=`` (zero-shot columns only) passes the corpus check and reaches the model load."""
    with pytest.raises(AssertionError, match="expensive work started"):
        run_cli("compare", "--rows", "dense", "--ppl=", "--tasks", "piqa", "--no-isolate", "--quiet", cwd=tmp_path)


def test_every_isolated_row_passes_its_childs_checks(run_cli, no_work, tmp_path):  # noqa: F811
    """A compare run with settings only some rows read (--tau, --self-top-p, --head-split, --kv-groups): each row's
    child command line passes the child's own checks and reaches its model load. The child sees one row, so a
    setting its row does not read must stay out of its command line, or the child refuses it."""
    import argparse

    from daprune.evaluation import compare

    parser = argparse.ArgumentParser()
    compare.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["compare", "--tau", "0.1", "--self-top-p", "0.9", "--head-split", "paper",
                              "--kv-groups", "--ppl=", "--quiet"])
    for row in compare.select_rows(None):
        argv = compare.child_argv(args, row.key, str(tmp_path / "row.json"))[3:]
        with pytest.raises(AssertionError, match="expensive work started"):
            res = run_cli(*argv, cwd=tmp_path)
            pytest.fail(f"row {row.key}: the child refused ({res.stderr.strip()})")


def test_eval_json_folder_made_before_the_work(run_cli, no_work, tmp_path):  # noqa: F811
    out = tmp_path / "a" / "b" / "eval.json"
    with pytest.raises(AssertionError, match="expensive work started"):
        run_cli("eval", "--ppl", "wikitext2", "--json", str(out), "--quiet", cwd=tmp_path)
    assert out.parent.is_dir() and not out.exists()


@pytest.mark.parametrize("args,needle", [
    (["--rows", "dense,flap", "--head-split", "paper"], "--head-split shapes how a row splits each block, and no sel"),
    (["--rows", "dense", "--kv-groups"], "--kv-groups shapes how a row splits each block, and no selected row"),
])
def test_compare_refuses_what_no_row_reads(run_cli, no_work, tmp_path, args, needle):  # noqa: F811
    res = run_cli("compare", *args, "--quiet", cwd=tmp_path)
    assert res.returncode == 2 and needle in res.stderr


def test_compare_kv_groups_on_multi_head_model_refused_before_rows(run_cli, no_work, family_folders,  # noqa: F811
                                                                     tmp_path):
    res = run_cli("compare", "--model", str(family_folders["gpt2"]), "--rows", "dense,l2", "--kv-groups", "--ppl=",
                  "--tasks", "piqa", "--no-isolate", "--quiet", cwd=tmp_path)
    assert res.returncode == 2 and "one query head per KV head" in res.stderr
    with pytest.raises(AssertionError, match="expensive work started"):  # a GQA model goes on to its rows
        run_cli("compare", "--model", str(family_folders["qwen2"]), "--rows", "dense,l2", "--kv-groups", "--ppl=",
                "--tasks", "piqa", "--no-isolate", "--quiet", cwd=tmp_path)


@pytest.fixture(scope="module")
def uneven_qwen3(family_folders, tmp_path_factory) -> Path:
    """A per-layer pruned qwen3 folder (blocks of different widths) to use as a source."""
    from daprune.api import prune

    out = tmp_path_factory.mktemp("uneven") / "qwen3-pruned"
    res = prune(model=str(family_folders["qwen3"]), out=str(out), sparsity=0.2, layers="1:-1", calibration="random",
                nsamples=4, seqlen=32, progress=False)
    assert len({(len(r["kept_heads"]), r["kept_channels"]) for r in res.report["layers"]}) > 1
    return out


def test_prune_gguf_from_an_uneven_source_refused_under_any_layout(run_cli, no_work, uneven_qwen3,  # noqa: F811
                                                                    tmp_path):
    for layout in ("uniform", "per-layer"):
        out = tmp_path / f"out-{layout}"
        res = run_cli("prune", "--model", str(uneven_qwen3), "--out", str(out), "--gguf", str(tmp_path / "m.gguf"),
                      "--layout", layout, "--sparsity", "0.1", "--quiet", cwd=tmp_path)
        _assert_refused(res, out, "the source's blocks already have different widths")
