"""Saved pruned models load in real tools: transformers (remote code only when needed), daprune.load, lm-eval."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import CharTokenizer, tiny_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import daprune
from daprune.api import prune
from daprune.errors import ModelSourceError, OutputError
from daprune.loader import load_pruned
from daprune.models.adapter import get_adapter
from daprune.output import MODELING_FILE, modeling_template, save_pruned

IDS = torch.randint(0, 128, (2, 20), generator=torch.Generator().manual_seed(3))
ARCHS = ["llama", "qwen2", "mistral"]


def _prune(model, out: Path, **kw):
    settings = dict(calibration="random", nsamples=8, seqlen=32, batch_size=4, sparsity=0.3, progress=False)
    settings.update(kw)
    return prune(model=model, tokenizer=CharTokenizer(), out=str(out), **settings)


def char_tokenizer():
    """A real (saveable) HF tokenizer for the tiny models: one token per printable ASCII character."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "</s>": 1, **{chr(c): i + 2 for i, c in enumerate(range(32, 127))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@torch.no_grad()
def _logits(model) -> torch.Tensor:
    return model(IDS).logits


@torch.no_grad()
def _greedy_no_cache(model, prompt: torch.Tensor, n: int) -> torch.Tensor:
    seq = prompt
    for _ in range(n):
        nxt = model(seq, use_cache=False).logits[:, -1:].argmax(-1)
        seq = torch.cat([seq, nxt], dim=1)
    return seq


def _assert_cached_generation_matches(model) -> None:
    """generate() with the KV cache must pick the same tokens as re-running the whole sequence."""
    prompt = IDS[:1, :12]
    out = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    assert out.shape[1] > prompt.shape[1]
    assert torch.equal(out, _greedy_no_cache(model, prompt, 8)[:, : out.shape[1]])


@pytest.fixture(scope="module", params=ARCHS)
def nonuniform(request, tmp_path_factory):
    """A tiny model pruned in blocks 1..4 only (heads and channels), so its shapes differ per layer."""
    out = tmp_path_factory.mktemp(request.param) / "pruned"
    res = _prune(tiny_model(request.param), out, layers="1:-1", head_split="paper")
    return res, out


def test_nonuniform_config_and_files(nonuniform):
    res, out = nonuniform
    cfg = json.loads((out / "config.json").read_text())
    layers = cfg["daprune_layers"]
    assert len({json.dumps(s, sort_keys=True) for s in layers}) > 1
    assert any(s["num_attention_heads"] < 6 for s in layers), "the test should cover removed heads"
    assert cfg["auto_map"]["AutoModelForCausalLM"].startswith("modeling_daprune.Daprune")
    assert (out / MODELING_FILE).read_text() == modeling_template()
    assert list(out.glob("*.safetensors")) and not list(out.glob("*.bin"))


def test_vanilla_loading_of_a_per_layer_folder_fails_at_once_asking_for_remote_code(nonuniform):
    """In a fresh interpreter (no daprune imported): vanilla from_pretrained stops before building any model,
    with transformers' own "trust_remote_code=True" message (the folder has its own model type, as DeciLM's do);
    with remote code the same folder loads."""
    import subprocess
    import sys

    res, out = nonuniform
    cfg = json.loads((out / "config.json").read_text())
    family = res.model.config.model_type
    assert cfg["model_type"] == f"daprune_{family}" and cfg["architectures"][0].startswith("Daprune")
    assert cfg["auto_map"]["AutoConfig"].startswith("modeling_daprune.Daprune")
    code = f"""
import sys, transformers
from transformers import AutoModelForCausalLM
built = []
orig = transformers.PreTrainedModel.__init__
def spy(self, *a, **k):
    built.append(type(self).__name__)
    orig(self, *a, **k)
transformers.PreTrainedModel.__init__ = spy
try:
    AutoModelForCausalLM.from_pretrained({str(out)!r})
except ValueError as exc:
    assert "trust_remote_code=True" in str(exc), str(exc)
    assert not built, built
    assert "daprune" not in sys.modules
    print("REFUSED")
"""
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.stdout.strip().endswith("REFUSED"), run.stdout + run.stderr


def test_nonuniform_remote_code_round_trip(nonuniform):
    res, out = nonuniform
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert type(loaded).__name__.startswith("Daprune")
    assert torch.equal(_logits(loaded), _logits(res.model))
    cfg = AutoConfig.from_pretrained(out, trust_remote_code=True)
    assert cfg.daprune_layers == res.model.config.daprune_layers
    for layer, shape in zip(loaded.model.layers, cfg.daprune_layers, strict=True):
        attn = layer.self_attn
        assert attn.num_key_value_groups == shape["num_attention_heads"] // shape["num_key_value_heads"]
    _assert_cached_generation_matches(loaded)


def test_nonuniform_daprune_load(nonuniform):
    res, out = nonuniform
    model, tok = daprune.load(out)
    assert tok is None  # the CharTokenizer stand-in saves nothing
    # no remote code: the class is daprune's own (the one the folder's modeling_daprune.py copies), never the
    # folder's file, which transformers would import as a dynamic "transformers_modules" module
    assert type(model).__module__ == "daprune.io_templates.modeling_daprune"
    assert torch.equal(_logits(model), _logits(res.model))
    _assert_cached_generation_matches(model)


@pytest.mark.parametrize("arch", ARCHS)
def test_uniform_loads_with_vanilla_transformers(arch, tmp_path):
    out = tmp_path / "pruned"
    res = _prune(tiny_model(arch), out, layers="0:6", head_split="paper")
    cfg = json.loads((out / "config.json").read_text())
    assert "daprune_layers" not in cfg and "auto_map" not in cfg
    assert not (out / MODELING_FILE).exists()
    assert cfg["intermediate_size"] < 96
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=False).eval()
    assert torch.equal(_logits(loaded), _logits(res.model))
    _assert_cached_generation_matches(loaded)
    model, _ = load_pruned(out)
    assert torch.equal(_logits(model), _logits(res.model))


def test_hand_sliced_qwen3_without_update_config(tmp_path):
    """save_pruned writes the shapes the weights really have, even if update_config was never called."""
    model = tiny_model("qwen3")
    adapter = get_adapter(model)
    adapter.block(1).slice_heads([0, 1, 3, 4])
    adapter.block(2).slice_ffn(range(40))
    adapter.block(3).slice_heads([0, 3])
    out = save_pruned(model, None, tmp_path / "out", {})
    loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
    assert torch.equal(_logits(loaded), _logits(model))
    assert loaded.model.layers[3].self_attn.num_key_value_groups == 1
    _assert_cached_generation_matches(loaded)


# config keys each family uses for FLAP's o_proj / down_proj biases: a config flag, else daprune_extra_biases
FLAP_EXTRA_BIASES = {"llama": None, "qwen2": ["mlp.down_proj", "self_attn.o_proj"],
                     "qwen3": ["mlp.down_proj"], "mistral": ["mlp.down_proj", "self_attn.o_proj"]}


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("schedule", ["uniform", "adaptive"])
@pytest.mark.parametrize("arch", list(FLAP_EXTRA_BIASES))
def test_flap_biases_round_trip(arch, schedule, tmp_path):
    """FLAP's compensation biases on o_proj and down_proj survive saving: every loader gives identical logits."""
    out = tmp_path / "pruned"
    kw = dict(head_split="paper", sparsity=0.3) if schedule == "uniform" else dict(sparsity=0.4)
    kw["channel_multiple"] = 1  # tiny FFNs: the adaptive schedule's per-block widths must be able to differ
    res = _prune(tiny_model(arch, layers=3), out, layers="0:", seqlen=24, ffn_criterion="flap",
                 head_criterion="flap", schedule=schedule, **kw)
    layers = res.model.model.layers
    for lin in ("self_attn.o_proj", "mlp.down_proj"):  # heads and channels were removed, so both got biases
        biases = [layer.get_submodule(lin).bias for layer in layers]
        assert all(b is not None for b in biases) and any(float(b.detach().abs().sum()) > 0 for b in biases), lin
    cfg = json.loads((out / "config.json").read_text())
    assert bool(cfg.get("daprune_layers")) == (schedule == "adaptive")
    assert cfg.get("daprune_extra_biases") == FLAP_EXTRA_BIASES[arch]
    remote = schedule == "adaptive" or FLAP_EXTRA_BIASES[arch] is not None
    assert ("auto_map" in cfg) == remote and (out / MODELING_FILE).exists() == remote
    ref = _logits(res.model)
    loaders = {"daprune.load": lambda: daprune.load(out)[0],
               "from_pretrained": lambda: AutoModelForCausalLM.from_pretrained(out, trust_remote_code=remote).eval()}
    for name, load in loaders.items():
        loaded = load()
        assert torch.equal(_logits(loaded), ref), name
        _assert_cached_generation_matches(loaded)


def test_lm_eval_constructs_and_scores(tmp_path):
    """lm-eval's HF backend builds the non-uniform model through trust_remote_code and scores a request."""
    pytest.importorskip("lm_eval")
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    model = tiny_model()
    adapter = get_adapter(model)
    adapter.block(2).slice_heads([0, 1, 3, 4])
    adapter.block(3).slice_ffn(range(50))
    out = save_pruned(model, char_tokenizer(), tmp_path / "out", {})
    lm = HFLM(pretrained=str(out), trust_remote_code=True, batch_size=1, device="cpu")
    assert type(lm.model).__name__ == "DapruneLlamaForCausalLM"
    req = Instance(request_type="loglikelihood", doc={}, arguments=("hello", " world"), idx=0)
    (logprob, _), = lm.loglikelihood([req])
    assert logprob < 0 and logprob == pytest.approx(_reference_logprob(model, lm, "hello", " world"), abs=1e-4)


TINY_TASK = """\
task: daprune_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


def _tiny_task(folder: Path) -> Path:
    """An lm-eval include folder with one local multiple-choice task of 4 documents."""
    folder.mkdir()
    docs = [{"question": "2 + 2 =", "choices": [" 4", " 5"], "label": 0},
            {"question": "sky is", "choices": [" green", " blue"], "label": 1},
            {"question": "a b c", "choices": [" d", " z", " q"], "label": 0},
            {"question": "cats say", "choices": [" moo", " meow"], "label": 1}]
    data = folder / "docs.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / "tiny_mc.yaml").write_text(TINY_TASK.format(data=data))
    return folder


def _lm_eval_folder(case: str, out: Path):
    """A pruned tiny model saved with a real tokenizer; returns (in-memory model, whether remote code is needed)."""
    if case == "flap-qwen2-uniform":  # uniform shapes, but FLAP biases vanilla Qwen2 cannot build
        model = _prune(tiny_model("qwen2", layers=3), out, layers="0:", seqlen=24, ffn_criterion="flap",
                       head_criterion="flap", head_split="paper").model
        char_tokenizer().save_pretrained(out)
        return model, True
    model = tiny_model(layers=3)
    adapter = get_adapter(model)
    for i in range(3) if case == "uniform" else (1,):
        adapter.block(i).slice_heads([0, 1, 3, 4])
        adapter.block(i).slice_ffn(range(50))
    save_pruned(model, char_tokenizer(), out, {})
    return model, case != "uniform"


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("case", ["uniform", "non-uniform", "flap-qwen2-uniform"])
def test_lm_eval_cli_style_on_saved_folder(tmp_path, case):
    """What ``lm_eval --model hf --model_args pretrained=DIR[,trust_remote_code=True]`` does, on a saved folder."""
    pytest.importorskip("lm_eval")
    from lm_eval.evaluator import simple_evaluate
    from lm_eval.tasks import TaskManager

    out = tmp_path / "out"
    model, remote = _lm_eval_folder(case, out)
    assert (out / MODELING_FILE).exists() == remote
    model_args = f"pretrained={out}" + (",trust_remote_code=True" if remote else "")
    manager = TaskManager(include_path=str(_tiny_task(tmp_path / "tasks")), include_defaults=False)
    res = simple_evaluate(model="hf", model_args=model_args, tasks=["daprune_tiny_mc"], task_manager=manager,
                          device="cpu", batch_size=1, num_fewshot=0, bootstrap_iters=0, log_samples=True)
    acc = res["results"]["daprune_tiny_mc"]["acc,none"]
    assert 0.0 <= acc <= 1.0
    assert res["n-samples"]["daprune_tiny_mc"]["effective"] == 4
    # lm-eval scored with the pruned model itself (a wrong load would give other log-likelihoods)
    tok = AutoTokenizer.from_pretrained(out)  # as lm-eval loads it (for qwen2 transformers picks Qwen2Tokenizer)
    for sample in res["samples"]["daprune_tiny_mc"]:
        for (ctx, cont), (logprob, _) in zip(sample["arguments"], sample["filtered_resps"], strict=True):
            assert math.isfinite(logprob)
            assert logprob == pytest.approx(_logprob(model, tok.encode(ctx), tok.encode(cont)), abs=1e-4)


def _reference_logprob(model, lm, context: str, continuation: str) -> float:
    return _logprob(model, lm.tok_encode(context), lm.tok_encode(continuation))


@torch.no_grad()
def _logprob(model, ctx: list[int], cont: list[int]) -> float:
    ids = torch.tensor([ctx + cont])
    logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
    return float(sum(logp[len(ctx) - 1 + i, t] for i, t in enumerate(cont)))


def test_template_needs_only_torch_and_transformers():
    imports = [line for line in modeling_template().splitlines() if line.startswith(("import ", "from "))]
    import sys

    allowed = ("__future__", "torch", "transformers", *sys.stdlib_module_names)
    assert imports and all(line.split()[1].split(".")[0] in allowed for line in imports)
    assert "daprune" not in "".join(imports)


def test_load_refuses_pickled_weights(tmp_path):
    model = tiny_model()
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelSourceError, match="safetensors"):
        load_pruned(tmp_path)


# -- atomic writes -----------------------------------------------------------------------------------
def _boom(_tmp: Path) -> None:
    raise RuntimeError("disk full")


def test_failure_inside_save_leaves_nothing(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk full"):
        save_pruned(tiny_model(), None, out, {}, extra=_boom)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no hidden temp folder either


def test_existing_folder_refused_unless_overwrite(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(OutputError, match="already exists"):
        save_pruned(tiny_model(), None, out, {})
    assert (out / "keep.txt").read_text() == "mine"
    save_pruned(tiny_model(), None, out, {"v": 2}, overwrite=True)
    assert not (out / "keep.txt").exists()
    written = json.loads((out / "report.json").read_text())
    assert written["v"] == 2 and written["output"]["shards"] == 1  # what was really written is added
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_failed_overwrite_keeps_the_old_folder(tmp_path):
    out = save_pruned(tiny_model(), None, tmp_path / "out", {"v": 1})
    with pytest.raises(RuntimeError):
        save_pruned(tiny_model(), None, out, {"v": 2}, overwrite=True, extra=_boom)
    assert json.loads((out / "report.json").read_text())["v"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


@pytest.mark.parametrize("damage", ["missing", "extra"])
def test_daprune_load_refuses_a_per_layer_folder_whose_tensors_do_not_fit(nonuniform, tmp_path, damage):
    """A missing tensor would be random-initialised and an extra one silently dropped: both are errors."""
    import shutil

    from safetensors.torch import load_file, save_file

    from daprune.errors import WeightsMismatchError

    _, out = nonuniform
    folder = tmp_path / "copy"
    shutil.copytree(out, folder)
    path = next(folder.glob("*.safetensors"))
    state = load_file(str(path))
    if damage == "missing":
        state.pop("model.layers.2.mlp.down_proj.weight")
    else:
        state["model.layers.2.mlp.spare.weight"] = torch.zeros(2, 2)
    save_file(state, str(path), metadata={"format": "pt"})
    with pytest.raises(WeightsMismatchError, match="missing" if damage == "missing" else "no place"):
        daprune.load(folder)
