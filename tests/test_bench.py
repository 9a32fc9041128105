"""`daprune bench` on tiny models: documented JSON keys, MACs by hand, speedup = dense time / pruned time."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from conftest import benchmark_module, tiny_model

from daprune.cli import main
from daprune.errors import ConfigError
from daprune.evaluation.bench import (
    BenchSettings,
    _alternate,
    count_macs,
    greedy_decode,
    resolve_device,
    summarise,
    weight_bytes,
)
from daprune.models.adapter import get_adapter
from daprune.output import save_pruned

METRIC_KEYS = {"params", "weight_bytes", "macs_per_token", "macs_linear", "macs_attention", "prefill_b1_tok_s",
               "prefill_b8_tok_s", "decode_tok_s", "median_s", "times_s"}


def _sliced(model):
    """Block 0 keeps 4 of 6 heads, block 1 keeps 40 of 96 FFN channels (a non-uniform model)."""
    adapter = get_adapter(model)
    adapter.block(0).slice_heads([0, 1, 3, 4])
    adapter.block(1).slice_ffn(range(40))
    return model


def test_macs_hand_count():
    """hidden 48, 6 heads of 8 (2 KV), FFN 96, vocab 128, 2 layers, context 16."""
    dense = tiny_model(layers=2)
    layer = 48 * 48 + 48 * 16 + 48 * 16 + 48 * 48 + 3 * 48 * 96  # q, k, v, o, gate/up/down
    lm_head = 48 * 128
    attn = 2 * 6 * 8 * 16  # scores + weighted values, per layer
    assert count_macs(dense, context=16) == {"linear": 2 * layer + lm_head, "attention": 2 * attn,
                                             "total": 2 * layer + lm_head + 2 * attn}
    pruned = _sliced(tiny_model(layers=2))
    layer0 = 48 * 32 + 48 * 16 + 48 * 16 + 32 * 48 + 3 * 48 * 96
    layer1 = layer - 3 * 48 * 56
    assert count_macs(pruned, context=16) == {"linear": layer0 + layer1 + lm_head,
                                              "attention": 2 * 4 * 8 * 16 + attn,
                                              "total": layer0 + layer1 + lm_head + 2 * 4 * 8 * 16 + attn}


def test_weight_bytes_counts_tied_embeddings_once():
    model = tiny_model()
    fp32 = weight_bytes(model)
    assert fp32 == 4 * sum(p.numel() for p in model.parameters())
    assert weight_bytes(model.to(torch.bfloat16)) * 2 == fp32


def test_speedup_is_dense_time_over_pruned_time():
    s = BenchSettings(seq_len=4, batch_sizes=(1, 8), new_tokens=5, repeats=3)
    static = {n: {"params": 10, "weight_bytes": 40, "macs_per_token": m} for n, m in (("dense", 200), ("pruned", 100))}
    raw = {"dense": {"prefill_b1": [2.0, 4.0, 3.0], "prefill_b8": [8.0, 8.0, 8.0], "decode": [1.0, 9.0, 2.0]},
           "pruned": {"prefill_b1": [1.0, 2.0, 1.5], "prefill_b8": [4.0, 5.0, 4.0], "decode": [1.0, 1.0, 1.0]}}
    out = summarise(static, raw, s)
    assert out["speedup"]["prefill"] == out["speedup"]["prefill_b1"] == pytest.approx(3.0 / 1.5)
    assert out["speedup"]["prefill_b8"] == pytest.approx(8.0 / 4.0)
    assert out["speedup"]["decode"] == pytest.approx(2.0 / 1.0)
    assert out["speedup"]["macs"] == 2.0
    assert out["dense"]["prefill_b8_tok_s"] == pytest.approx(8 * 4 / 8.0)
    assert out["pruned"]["decode_tok_s"] == pytest.approx(4 / 1.0)  # new_tokens - 1 timed steps


def test_repeats_alternate_between_models():
    calls: list[str] = []
    models = {"dense": "D", "pruned": "P"}
    times = _alternate(models, lambda m: calls.append(m) or 1.0, BenchSettings(repeats=3, warmup=1))
    assert calls == ["D", "P"] * 4
    assert times == {"dense": [1.0] * 3, "pruned": [1.0] * 3}


def test_greedy_decode_matches_generate():
    model = _sliced(tiny_model())
    prompt = torch.randint(0, 128, (1, 10), generator=torch.Generator().manual_seed(0))
    tokens, seconds = greedy_decode(model, prompt, 8)
    assert seconds > 0
    ref = model.generate(prompt, max_new_tokens=8, do_sample=False)
    assert torch.equal(tokens[:, : ref.shape[1]], ref)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("bench")
    dense = root / "dense"
    tiny_model().save_pretrained(dense)
    report = {"model_source": {"kind": "folder", "path": str(dense), "origin": str(dense)}}
    pruned = save_pruned(_sliced(tiny_model()), None, root / "pruned", report)
    return dense, pruned


def test_cli_json(folders, tmp_path, capsys):
    dense, pruned = folders
    threads = torch.get_num_threads()
    try:
        _run_cli_json(dense, pruned, tmp_path, capsys)
    finally:
        torch.set_num_threads(threads)


def _run_cli_json(dense: Path, pruned: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.json"
    rc = main(["bench", "--model", str(pruned), "--json", str(out), "--repeats", "2", "--seq-len", "8",
               "--new-tokens", "4", "--device", "cpu", "--threads", "1"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "decode b1 tok/s" in table and "MACs/token (ctx 8)" in table
    result = json.loads(out.read_text())
    assert {"dense", "pruned", "speedup"} <= set(result)
    for name in ("dense", "pruned"):
        assert set(result[name]) >= METRIC_KEYS
        assert all(len(v) == 2 for v in result[name]["times_s"].values())
    assert result["pruned"]["params"] < result["dense"]["params"]
    assert result["pruned"]["macs_per_token"] < result["dense"]["macs_per_token"]
    for key in ("prefill_b1", "prefill_b8", "decode"):
        expected = result["dense"]["median_s"][key] / result["pruned"]["median_s"][key]
        assert result["speedup"][key] == pytest.approx(expected)
    assert result["speedup"]["prefill"] == result["speedup"]["prefill_b1"]
    assert result["models"] == {"dense": str(dense), "pruned": str(pruned)}
    assert result["environment"]["dtype"] == "float32"
    assert result["environment"]["threads"] == 1


def test_cli_without_baseline_is_a_clear_error(tmp_path, capsys):
    folder = save_pruned(_sliced(tiny_model()), None, tmp_path / "pruned", {"model_source": None})
    assert main(["bench", "--model", str(folder), "--repeats", "1"]) == 2
    assert "--baseline" in capsys.readouterr().err


@pytest.fixture
def gpu_count(monkeypatch):
    """Pretend to have this many CUDA devices: only device resolution is checked, nothing runs on CUDA."""
    def set_count(n: int) -> None:
        monkeypatch.setattr(torch.cuda, "is_available", lambda: n > 0)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    return set_count


def test_device_auto_prefers_cuda(gpu_count):
    gpu_count(1)
    assert resolve_device("auto") == "cuda:0"
    assert resolve_device("cuda") == "cuda:0" and resolve_device("cpu") == "cpu"
    gpu_count(0)
    assert resolve_device("auto") == "cpu"


def test_device_cuda_without_gpu_is_a_clear_error(gpu_count, folders, capsys):
    gpu_count(0)
    with pytest.raises(ConfigError, match="no CUDA device"):
        resolve_device("cuda")
    _, pruned = folders
    assert main(["bench", "--model", str(pruned), "--device", "cuda", "--repeats", "1"]) == 2
    err = capsys.readouterr().err
    assert "--device cuda: no CUDA device is visible" in err and "Traceback" not in err


def test_speed_bench_device_option(monkeypatch, gpu_count, capsys):
    sb = benchmark_module("speed_bench")
    assert sb.parse_args([]).device == "cpu"
    seen = []
    monkeypatch.setattr(sb, "load_for_bench", lambda source, dtype, device: seen.append((source, device)) or source)
    monkeypatch.setattr(sb, "bench_models", lambda dense, pruned, s: {"dense": dense, "pruned": pruned})
    assert sb.bench_variant(Path("P"), "D", "float32", BenchSettings(), "cuda") == {"dense": "D", "pruned": "P"}
    assert seen == [("D", "cuda"), ("P", "cuda")]
    gpu_count(0)
    assert sb.main(["--device", "cuda"]) == 2  # refused before any pruning
    assert "no CUDA device" in capsys.readouterr().err


def _zs(limit, **accs):
    tasks = {t: {"acc": a, "acc_norm": a / 2, "n": 10} for t, a in accs.items()}
    metrics = {t: ("acc_norm" if t == "hellaswag" else "acc") for t in accs}
    mean = sum(tasks[t][metrics[t]] for t in tasks) / len(tasks)
    return {"tasks": tasks, "mean_metrics": metrics, "mean": mean, "limit": limit}


def test_zeroshot_side_by_side_reports_each_tasks_metric_and_refuses_unlike_runs():
    zs = benchmark_module("zeroshot_bench")
    table = zs.side_by_side({"Dense": _zs(10, piqa=0.6, hellaswag=0.5), "Ours": _zs(10, piqa=0.55, hellaswag=0.6)})
    lines = table.splitlines()
    assert lines[0] == "| task | metric | Dense | Ours | Ours - Dense | n |"
    assert lines[2] == "| piqa | acc | 60.0 | 55.0 | -5.0 | 10 |"
    assert lines[3] == "| hellaswag | acc_norm | 25.0 | 30.0 | +5.0 | 10 |"  # the metric the mean uses: acc_norm
    assert lines[4] == "| **mean** | | **42.50** | **42.50** | **+0.00** | |"
    with pytest.raises(ValueError, match="not comparable"):
        zs.side_by_side({"a": _zs(10, piqa=0.6), "b": _zs(None, piqa=0.6)})
    with pytest.raises(ValueError, match="no result"):
        zs.side_by_side({"a": _zs(10, piqa=0.6, boolq=0.5), "b": _zs(10, piqa=0.6)})
    with pytest.raises(ValueError, match="at least two"):
        zs.side_by_side({"a": _zs(10, piqa=0.6)})


def test_cuda_check_agreement_measures_what_differs(tmp_path):
    """benchmarks/cuda_check.py's comparison of two output folders: equal folders agree exactly; a scaled tensor
    shows its relative difference; a different shape is reported as such."""
    from safetensors.torch import save_file

    cc = benchmark_module("cuda_check")
    a, b, c = (tmp_path / n for n in "abc")
    for f in (a, b, c):
        f.mkdir()
    w = {"x": torch.tensor([[1.0, -4.0], [2.0, 0.5]]), "y": torch.ones(3)}
    save_file(w, str(a / "model.safetensors"))
    save_file({"x": w["x"] * 1.01, "y": w["y"]}, str(b / "model.safetensors"))
    save_file({"x": w["x"][:, :1].contiguous(), "y": w["y"]}, str(c / "model.safetensors"))
    same = cc.agreement(a, a)
    assert same == {"same_tensors_and_shapes": True, "max_rel_diff": 0.0, "tensors_over_1e-3": 0, "tensors": 2}
    scaled = cc.agreement(a, b)
    assert scaled["same_tensors_and_shapes"] and scaled["tensors_over_1e-3"] == 1
    assert scaled["max_rel_diff"] == pytest.approx(0.04 / 4.0, rel=1e-5)  # |x * 0.01| at most 0.04, max |x| = 4
    assert cc.agreement(a, c)["same_tensors_and_shapes"] is False


def test_zeroshot_compare_counts_flipped_documents_and_the_largest_score_change(capsys):
    zs = benchmark_module("zeroshot_bench")

    def result(lls, correct, wall):
        samples = [{"doc_id": i, "filtered_resps": [[x, False] for x in ll], "acc": c}
                   for i, (ll, c) in enumerate(zip(lls, correct, strict=True))]
        return {"tasks": {"piqa": {"acc": sum(correct) / len(correct), "acc_stderr": 0.1, "n": len(correct)}},
                "mean_metrics": {"piqa": "acc"}, "samples": {"piqa": samples}, "wall_s": wall, "settings": {}}

    ref = result([[-1.0, -2.0], [-3.0, -2.5], [-4.0, -4.5]], [1.0, 0.0, 1.0], 10.0)
    other = result([[-1.0, -2.0], [-3.0, -2.9], [-4.25, -4.5]], [1.0, 1.0, 1.0], 4.0)
    args = argparse.Namespace(tasks=["piqa"])
    report = zs.compare(args, {"one-by-one": ref, "shared": other})
    row = report["tasks"]["piqa"]
    assert row["docs_flipped"] == 1 and row["max_abs_dll"] == pytest.approx(0.4)
    assert (row["one-by-one"], row["shared"], row["n"]) == (pytest.approx(2 / 3), 1.0, 3)
    assert report["wall_s"] == {"one-by-one": 10.0, "shared": 4.0}
    with pytest.raises(SystemExit):
        zs.parse_args(["--compare-dtypes", "--compare-scoring"])
    assert "two separate comparisons" in capsys.readouterr().err
