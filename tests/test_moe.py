"""Mixture-of-experts families (Mixtral, Qwen2-MoE with its shared expert, Qwen3-MoE) on tiny random models.

Each expert is a depth-2 unit ranked on statistics of its real contribution to the block output (the
tokens the router sends it, scaled by the routing weight); all experts of a layer keep the same number of
channels, so the family's config still describes the layer.
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_families import SEQ, assert_reloads_and_generates, ids, logits, randomise_norms_and_biases
from test_families import _prune as prune_tiny

import daprune
from daprune.errors import ConfigError
from daprune.models.adapter import get_adapter
from daprune.models.moe import expert_moments
from daprune.stores import ResidentStore

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe"]
EXPERTS, WIDTH, SHARED = 4, 64, 40


def tiny(family: str, *, layers: int = 4, seed: int = 0, experts: int = EXPERTS):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=48, num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
              head_dim=12, max_position_embeddings=256, tie_word_embeddings=False, num_experts_per_tok=2)
    extra = {"mixtral": dict(num_local_experts=experts, intermediate_size=WIDTH),
             "qwen2_moe": dict(num_experts=experts, moe_intermediate_size=WIDTH, intermediate_size=96,
                               shared_expert_intermediate_size=SHARED, norm_topk_prob=False),
             "qwen3_moe": dict(num_experts=experts, moe_intermediate_size=WIDTH, intermediate_size=96,
                               norm_topk_prob=True)}[family]
    config = AutoConfig.for_model(family, **kw, **extra)
    return randomise_norms_and_biases(AutoModelForCausalLM.from_config(config).eval())


def _prune(model, **kw):
    """The families' tiny-model prune, over blocks 1..2 of these 4-block models."""
    return prune_tiny(model, **{"layers": "1:3", **kw})


@pytest.mark.parametrize("family", FAMILIES)
def test_zero_sparsity_is_exact(family):
    model = tiny(family)
    want = logits(model)
    assert torch.equal(logits(_prune(copy.deepcopy(model), sparsity=0.0).model), want)


@pytest.mark.parametrize("family", FAMILIES)
def test_slicing_equals_masking(family):
    """Keeping other channels in every expert (and in the shared expert) == zeroing the removed ones' down columns."""
    model = tiny(family)
    masked = copy.deepcopy(model)
    block = get_adapter(model).block(1)
    gen = torch.Generator().manual_seed(3)
    keep = [sorted(torch.randperm(WIDTH, generator=gen)[:40].tolist()) for _ in range(EXPERTS)]
    shared_keep = sorted(torch.randperm(SHARED, generator=gen)[:30].tolist()) if family == "qwen2_moe" else None
    with torch.no_grad():
        mlp = masked.model.layers[1].mlp
        for e, k in enumerate(keep):
            gone = [c for c in range(WIDTH) if c not in k]
            mlp.experts.down_proj[e][:, gone] = 0
        if shared_keep is not None:
            mlp.shared_expert.down_proj.weight[:, [c for c in range(SHARED) if c not in shared_keep]] = 0
    block.slice_experts(keep, shared_keep)
    assert tuple(model.model.layers[1].mlp.experts.down_proj.shape) == (EXPERTS, 48, 40)
    assert model.model.layers[1].mlp.experts.gate_up_proj.shape[1] == 80
    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)


def test_experts_must_keep_equal_widths():
    block = get_adapter(tiny("mixtral")).block(1)
    with pytest.raises(ValueError, match="same"):
        block.slice_experts([list(range(40))] * 3 + [list(range(39))])


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_reload_generate(family, tmp_path):
    """Expert channels go; routing counts add up; the folder reloads with the same logits; generation works."""

    result = _prune(tiny(family), sparsity=0.25, out=str(tmp_path / "o"))
    model = result.model
    pruned = [r for r in result.report["layers"] if r["pruned"]]
    assert [r["index"] for r in pruned] == [1, 2]
    for row in pruned:
        info = row["experts"]
        assert sum(info["tokens"]) == 2 * 8 * SEQ  # top-2 routing of every calibration token
        assert info["kept_channels"] < WIDTH and info["kept_channels"] % 8 == 0
        width = model.model.layers[row["index"]].mlp.experts.down_proj.shape[2]
        assert width == info["kept_channels"] == row["kept_channels"]
        if family == "qwen2_moe":
            shared = model.model.layers[row["index"]].mlp.shared_expert
            assert info["shared_kept_channels"] == shared.down_proj.in_features
            assert info["shared_kept_channels"] < SHARED
    assert model.model.layers[0].mlp.experts.down_proj.shape[2] == WIDTH  # outside --layers: untouched
    params = sum(p.numel() for p in model.parameters())
    assert result.report["params"]["after"] == params
    assert_reloads_and_generates(model, tmp_path / "o")


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_uniform_prune_loads_in_vanilla_transformers(family, tmp_path):
    """Every layer's experts at one width: the family's own config key states it, no remote code needed."""
    from transformers import AutoModelForCausalLM

    result = _prune(tiny(family), sparsity=0.15, layers="0:4", head_split="ffn-only", out=str(tmp_path / "o"))
    assert result.report["shapes"]["uniform"]
    assert not (tmp_path / "o" / "modeling_daprune.py").exists()
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    key = "intermediate_size" if family == "mixtral" else "moe_intermediate_size"
    assert getattr(vanilla.config, key) == vanilla.model.layers[0].mlp.experts.down_proj.shape[2] < WIDTH
    assert torch.equal(logits(vanilla), logits(result.model))


def _direct_moments(layer, x: torch.Tensor, family: str) -> tuple[list[torch.Tensor], list[int], torch.Tensor | None]:
    """Each expert's E[r r^T] over all tokens, r = routing weight * act(gate x) * (up x) if routed, else 0,
    computed token by token from the raw weights (softmax, top-k and renormalisation written out here)."""
    mlp = layer.mlp
    probs = torch.softmax(x @ mlp.gate.weight.T, -1)
    top_w, top_i = torch.topk(probs, 2, -1)
    if family != "qwen2_moe":  # Mixtral always renormalises; the tiny Qwen3 sets norm_topk_prob, Qwen2 does not
        top_w = top_w / top_w.sum(-1, keepdim=True)
    n_tok, width = x.shape[0], mlp.experts.down_proj.shape[2]
    sums = [torch.zeros(width, width, dtype=torch.float64) for _ in range(EXPERTS)]
    counts = [0] * EXPERTS
    act = mlp.experts.act_fn
    for t in range(n_tok):
        for j in range(2):
            e = int(top_i[t, j])
            gate = mlp.experts.gate_up_proj[e][:width] @ x[t]
            up = mlp.experts.gate_up_proj[e][width:] @ x[t]
            r = (top_w[t, j] * act(gate) * up).double()
            sums[e] += torch.outer(r, r)
            counts[e] += 1
    shared = None
    if family == "qwen2_moe":
        s = mlp.shared_expert
        rows = (torch.sigmoid(x @ mlp.shared_expert_gate.weight.T) * s.act_fn(x @ s.gate_proj.weight.T)
                * (x @ s.up_proj.weight.T)).double()
        shared = rows.T @ rows / n_tok
    return [m / n_tok for m in sums], counts, shared


@pytest.mark.parametrize("family", FAMILIES)
@torch.no_grad()
def test_routing_weighted_statistics_equal_a_direct_computation(family):
    model = tiny(family)
    adapter = get_adapter(model)
    store = ResidentStore(adapter)
    x = ids(3)
    h, contexts = store.embed(x, 3), store.layer_inputs(SEQ)
    block = adapter.block(0)
    seen = []
    handle = block.layer.mlp.register_forward_pre_hook(lambda _m, args: seen.append(args[0].reshape(-1, 48)))
    try:
        routed, shared = expert_moments(block, h, contexts[0], batch_size=2)
    finally:
        handle.remove()
    mlp_in = torch.cat(seen)
    want, counts, want_shared = _direct_moments(block.layer, mlp_in, family)
    assert sum(counts) == 2 * 3 * SEQ and min(counts) > 0
    for e in range(EXPERTS):
        assert routed[e].routed == counts[e] and routed[e].n == 3 * SEQ
        torch.testing.assert_close(routed[e].second.double(), want[e], rtol=1e-4, atol=1e-7)
    if family == "qwen2_moe":
        torch.testing.assert_close(shared.second.double(), want_shared, rtol=1e-4, atol=1e-7)
    else:
        assert shared is None


def _starve_last_expert(model) -> None:
    """Router rows [w, -w, u, -u, 0]: for any input two of the first four logits are >= 0 = the last one's,
    so top-2 routing never picks expert 4."""
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in model.model.layers:
            w, u = torch.randn(2, 48, generator=gen)
            layer.mlp.gate.weight.copy_(torch.stack([w, -w, u, -u, torch.zeros(48)]))


@pytest.mark.parametrize("policy", ["magnitude", "uniform", "keep"])
def test_unrouted_experts_are_reported_and_follow_the_users_choice(policy):
    model = tiny("mixtral", experts=5)
    _starve_last_expert(model)
    dense = copy.deepcopy(model)
    result = _prune(model, sparsity=0.15, unrouted_experts=policy)
    for row in (r for r in result.report["layers"] if r["pruned"]):
        info = row["experts"]
        assert info["tokens"][4] == 0 and info["unrouted"] == [4] and info["unrouted_policy"] == policy
        experts = result.model.model.layers[row["index"]].mlp.experts
        if policy == "keep":
            assert info["skipped"] and experts.down_proj.shape[2] == WIDTH
            continue
        kept = experts.down_proj.shape[2]
        assert kept < WIDTH
        old = dense.model.layers[row["index"]].mlp.experts
        if policy == "magnitude":  # the channels with the largest ||[gate; up] row|| * ||down column||
            gu = old.gate_up_proj[4]
            norm = (gu[:WIDTH].pow(2).sum(1) + gu[WIDTH:].pow(2).sum(1)).sqrt() * old.down_proj[4].norm(dim=0)
            want = sorted(torch.topk(norm, kept).indices.tolist())
            assert torch.equal(experts.down_proj[4], old.down_proj[4][:, want])


def test_settings_without_meaning_for_experts_are_refused_before_work(tmp_path):
    with pytest.raises(ConfigError, match="mixture"):
        _prune(tiny("qwen3_moe"), recovery="paper")
    with pytest.raises(ConfigError, match="not defined on experts"):
        _prune(tiny("qwen3_moe"), ffn_criterion="flap", selection="score")
    with pytest.raises(ConfigError, match="--compensate-mean is not implemented for mixture-of-experts"):
        _prune(tiny("qwen3_moe"), compensate_mean=True)
    with pytest.raises(ConfigError, match="--error-weight fisher is not implemented for mixture-of-experts"):
        _prune(tiny("qwen3_moe"), error_weight="fisher")
    tiny("mixtral").save_pretrained(tmp_path / "src")
    with pytest.raises(ConfigError, match="streaming is not possible.*mixture-of-experts"):
        daprune.prune(model=str(tmp_path / "src"), out=str(tmp_path / "o"), streaming=True, sparsity=0.2,
                      layers="1:3", calibration="random", nsamples=8, seqlen=SEQ, progress=False)
    assert not (tmp_path / "o").exists()


def test_cli_prunes_a_checkpoint_folder_and_reports_experts(tmp_path, capsys):
    """A saved checkpoint (per-expert tensors on disk, fused 3-D parameters in the model) through the CLI."""
    import json

    from daprune.cli import main

    tiny("qwen2_moe").save_pretrained(tmp_path / "src")
    out = tmp_path / "o"
    rc = main(["prune", "--model", str(tmp_path / "src"), "--out", str(out), "--sparsity", "0.2", "--layers", "1:3",
               "--calibration", "random", "--nsamples", "8", "--seqlen", str(SEQ), "--batch-size", "4", "--quiet"])
    assert rc == 0
    assert "kept/expert" in capsys.readouterr().out
    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["unrouted_experts"] == "magnitude"
    assert [r["experts"]["kept_channels"] for r in report["layers"] if r["pruned"]] == \
        [s["moe_intermediate_size"] for s in report["shapes"]["layers"][1:3]]
    assert (out / "layers.png").is_file()


@pytest.mark.parametrize("which", ["one expert's gate", "every expert of a layer"])
def test_a_missing_expert_tensor_is_an_error_not_a_random_expert(tmp_path, which):
    """Per-expert tensors are merged while loading; a gap is refused (transformers' conversion error, or our
    check of its loading report), never a randomly initialised expert."""
    from safetensors.torch import load_file, save_file

    from daprune.errors import ModelSourceError, WeightsMismatchError

    tiny("mixtral").save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    state = load_file(str(path))
    experts = [k for k in state if "layers.1." in k and "experts." in k]
    gone = experts[:1] if which.startswith("one") else experts
    save_file({k: v for k, v in state.items() if k not in gone}, str(path), metadata={"format": "pt"})
    error, match = (ModelSourceError, "conversion") if which.startswith("one") else (WeightsMismatchError, "missing")
    with pytest.raises(error, match=match):
        daprune.prune(model=str(tmp_path / "src"), out=str(tmp_path / "o"), sparsity=0.2, layers="1:3",
                      calibration="random", nsamples=8, seqlen=SEQ, progress=False)
    assert not (tmp_path / "o").exists()


def test_dense_layers_of_a_moe_model_and_obs_on_experts(tmp_path):
    """Qwen2-MoE's ``mlp_only_layers`` are ordinary FFN blocks beside the MoE ones; with enough routed tokens
    per channel the experts use OBS (kept columns compensated), and the mixed folder still round-trips."""
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(tiny("qwen2_moe").config)
    config.mlp_only_layers = [1]
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).eval()
    assert not hasattr(model.model.layers[1].mlp, "experts")
    result = _prune(model, sparsity=0.1, nsamples=32, out=str(tmp_path / "o"))
    rows = {r["index"]: r for r in result.report["layers"]}
    assert rows[1]["experts"] is None and rows[1]["kept_channels"] < 96  # the dense FFN, pruned as usual
    assert "obs" in rows[2]["experts"]["selection"]
    want = logits(result.model)
    reloaded, _ = daprune.load(tmp_path / "o")
    assert torch.equal(logits(reloaded), want)
    remote = AutoModelForCausalLM.from_pretrained(tmp_path / "o", trust_remote_code=True).eval()
    assert torch.equal(logits(remote), want)
