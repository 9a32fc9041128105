"""``--layout uniform``: every block at one shared split, a plain family config, no remote code."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from test_families import _prune, _silence_heads, ids, logits, tiny
from test_moe import tiny as tiny_moe

import daprune
from daprune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3", "mixtral"])
def test_uniform_layout_is_a_plain_checkpoint(family, tmp_path):
    """Every block pruned to the same widths; config.json is the family's own (no daprune_layers, no remote
    code, its own model type); vanilla transformers loads it with the logits of the pruned model."""
    from transformers import AutoModelForCausalLM

    model = tiny_moe(family) if family == "mixtral" else tiny(family)
    result = _prune(model, sparsity=0.2, layers="0:", layout="uniform", out=str(tmp_path / "o"))
    shapes = result.report["shapes"]
    assert shapes["uniform"] and all(r["pruned"] for r in result.report["layers"])  # every block, not 4:-2
    width = "moe_intermediate_size" if family == "mixtral" else "intermediate_size"
    assert shapes["layers"][0][width] < (64 if family == "mixtral" else 96)
    cfg = json.loads((tmp_path / "o" / "config.json").read_text())
    assert cfg["model_type"] == family and "daprune_layers" not in cfg and "auto_map" not in cfg
    assert not (tmp_path / "o" / "modeling_daprune.py").exists()
    assert result.report["layout"]["mode"] == "uniform"
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    assert torch.equal(logits(vanilla), logits(result.model))
    assert torch.equal(logits(vanilla), logits(daprune.load(tmp_path / "o")[0]))


def test_the_shared_split_follows_the_blocks_errors():
    """Heads that add nothing in every block cost nothing to remove: the shared split takes them, and each
    block removes exactly those; with the same heads doing real work the split keeps every head."""
    silent = tiny("llama", heads=4, kv=2)
    for i in range(6):
        _silence_heads(silent, i, [1, 3])  # one head of each KV group
    result = _prune(silent, sparsity=0.2, layers="0:", layout="uniform", tau=0.0)
    layout = result.report["layout"]
    assert layout["plan"]["heads_per_group"] == 1
    assert min(layout["total_error"], key=layout["total_error"].get) == "1"
    assert all(r["kept_heads"] == [0, 2] for r in result.report["layers"])
    busy = _prune(tiny("llama", heads=4, kv=2), sparsity=0.2, layers="0:", layout="uniform", tau=0.0)
    assert busy.report["layout"]["plan"]["heads_per_group"] == 0  # random heads all matter more than channels
    assert all(len(r["kept_heads"]) == 4 for r in busy.report["layers"])


@pytest.mark.parametrize("split", ["auto", "paper"])
def test_a_family_whose_config_cannot_state_fewer_heads_keeps_them(tmp_path, split):
    """GPT-2 derives head_dim from the head count: a uniform layout there prunes FFN channels only, under the
    paper's split rule too."""
    from test_families_extra import tiny as tiny_extra
    from transformers import AutoModelForCausalLM

    result = _prune(tiny_extra("gpt2"), sparsity=0.2, layers="0:", layout="uniform", head_split=split,
                    out=str(tmp_path / "o"))
    assert result.report["shapes"]["uniform"] and not (tmp_path / "o" / "modeling_daprune.py").exists()
    assert result.report["layout"]["heads"].startswith("kept")
    assert all(s["num_attention_heads"] == result.model.config.n_head for s in result.report["shapes"]["layers"])
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    assert torch.equal(vanilla(ids()).logits, result.model(ids()).logits)


def test_uniform_layout_streams_like_it_prunes_in_memory(tmp_path):
    tiny("qwen2").save_pretrained(tmp_path / "src")
    streamed = _prune(str(tmp_path / "src"), out=str(tmp_path / "s"), streaming=True, layers="0:", layout="uniform")
    in_memory = _prune(tiny("qwen2"), layers="0:", layout="uniform")
    assert streamed.report["layout"]["plan"] == in_memory.report["layout"]["plan"]
    state = in_memory.model.state_dict()
    for k, v in streamed.model.state_dict().items():
        assert torch.equal(v, state[k]), k


@pytest.mark.parametrize("settings, match", [
    (dict(layers="1:5"), "would leave some blocks dense"),
    (dict(schedule="adaptive", ffn_criterion="flap", head_criterion="flap"), "choose one"),
])
def test_settings_that_contradict_a_uniform_layout_are_refused(settings, match):
    with pytest.raises(ConfigError, match=match):
        _prune(copy.deepcopy(tiny("llama")), **{"layers": "0:", "layout": "uniform", **settings})


def test_per_layer_stays_the_default():
    result = _prune(tiny("llama"))
    assert result.report["layout"] == {"mode": "per-layer"}
    assert [r["pruned"] for r in result.report["layers"]] == [False, True, True, True, True, False]
    assert daprune.PruneConfig().layout == "per-layer"


def test_uniform_layout_covers_every_block_with_the_default_range():
    cfg = daprune.PruneConfig(layout="uniform")  # --layers left at its default 4:-2
    cfg.validate()
    assert cfg.block_range(30) == range(30)
    assert daprune.PruneConfig().block_range(30) == range(4, 28)
