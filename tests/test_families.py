"""Llama-shaped families (Llama, Mistral, Qwen2/3, Granite, Gemma, Gemma-2, Gemma-3), multi-head attention,
whole KV groups and the sparsity basis, on tiny random models.

Every block runs through the model's own layer code with the arguments the model passes it, so Gemma's
sliding-window layers, soft-capping and post-norms and Granite's multipliers need no code in daprune: the
first test proves the streamed per-block forward reproduces the model's hidden states exactly.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CharTokenizer

import daprune
from daprune.models.adapter import get_adapter
from daprune.stores import ResidentStore

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 24  # longer than the sliding window (8), so sliding-window layers see another mask than global ones
FAMILIES = ["llama", "mistral", "qwen2", "qwen3", "granite", "gemma", "gemma2", "gemma3_text"]


def tiny(family: str, *, heads: int = 4, kv: int = 2, layers: int = 6, seed: int = 0, **config):
    """A random decoder of ``family`` with non-trivial norms, biases and family-specific features switched on;
    ``config`` adds or overrides config fields (``attention_bias=True``)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kw = dict(vocab_size=128, hidden_size=48, intermediate_size=96, num_hidden_layers=layers,
              num_attention_heads=heads, num_key_value_heads=kv, head_dim=12, max_position_embeddings=256,
              tie_word_embeddings=False)
    extra = {
        "mistral": dict(sliding_window=8),
        "granite": dict(embedding_multiplier=2.0, residual_multiplier=0.5, attention_multiplier=0.2,
                        logits_scaling=2.0),
        "gemma2": dict(sliding_window=8, attn_logit_softcapping=20.0, final_logit_softcapping=15.0,
                       query_pre_attn_scalar=12),
        "gemma3_text": dict(sliding_window=8, final_logit_softcapping=15.0, query_pre_attn_scalar=12,
                            layer_types=["sliding_attention", "full_attention"] * (layers // 2)),
    }.get(family, {})
    config = AutoConfig.for_model(family, **{**kw, **extra, **config})
    return randomise_norms_and_biases(AutoModelForCausalLM.from_config(config).eval())


GEMMA_NORMS = ("gemma", "gemma2", "gemma3_text")  # RMSNorm x * (1 + w): weights near 0, not near 1


@torch.no_grad()
def randomise_norms_and_biases(model):
    """Non-trivial norm weights and biases (random init leaves them at 1 / 0, hiding slicing bugs)."""
    gemma = model.config.model_type in GEMMA_NORMS
    for name, p in model.named_parameters():
        if "norm" in name:
            p.uniform_(-0.5, 0.5) if gemma else p.uniform_(0.5, 1.5)
        elif name.endswith(".bias"):
            p.normal_(0, 0.1)
    return model


def ids(n: int = 2, seq: int = SEQ) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def logits(model) -> torch.Tensor:
    return model(ids()).logits


def _prune(model, **kw):
    settings = dict(sparsity=0.2, layers="1:5", calibration="random", nsamples=8, seqlen=SEQ, batch_size=4,
                    progress=False)
    settings.update(kw)
    return daprune.prune(model=model, tokenizer=CharTokenizer(), **settings)


# -- the model's own layer code --------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_blocks_reproduce_the_models_hidden_states(family):
    """Block by block with the captured arguments == the model's own forward (sliding windows included)."""
    model = tiny(family)
    adapter = get_adapter(model)
    store = ResidentStore(adapter)
    x = ids()
    h, contexts = store.embed(x, 2), store.layer_inputs(SEQ)
    with torch.no_grad():
        ref = model(x, output_hidden_states=True).hidden_states
    torch.testing.assert_close(h, ref[0], rtol=0, atol=0)
    for i in range(adapter.n_layers - 1):  # the last entry of hidden_states has the final norm applied
        h = adapter.block(i).forward(h, contexts[i])
        torch.testing.assert_close(h, ref[i + 1], rtol=0, atol=0)


def test_sliding_window_layers_get_their_own_mask():
    """Gemma-3's sliding and global layers receive different masks and rotary tables: captured per layer."""
    model = tiny("gemma3_text")
    contexts = ResidentStore(get_adapter(model)).layer_inputs(SEQ)
    sliding, full = contexts[0], contexts[1]
    assert not torch.equal(sliding["attention_mask"], full["attention_mask"])
    assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
    # the sliding mask hides keys more than 8 positions back; the global one only hides the future
    visible = lambda m: (m[0, 0] == 0).sum(-1)  # noqa: E731
    assert int(visible(sliding["attention_mask"]).max()) == 8
    assert int(visible(full["attention_mask"]).max()) == SEQ


def test_no_adapter_builds_masks_or_positions():
    """Adapters state structure only: nothing in them creates masks, rotary tables or position ids."""
    models = Path(daprune.__file__).parent / "models"
    banned = ("attention_mask", "rotary", "position_ids", "create_causal_mask", "position_embeddings", "triu")
    for path in models.glob("*.py"):
        if path.name in ("layer_inputs.py", "loading.py"):
            continue
        text = path.read_text()
        assert not [b for b in banned if b in text], f"{path.name} builds layer inputs itself"


def test_attention_probabilities_are_the_models_own():
    """Gemma-2's soft-capped, sliding-window attention: the probabilities read equal eager attention's."""
    model = tiny("gemma2")
    adapter = get_adapter(model)
    store = ResidentStore(adapter)
    x = ids()
    h, contexts = store.embed(x, 2), store.layer_inputs(SEQ)
    impl = model.config._attn_implementation
    model.config._attn_implementation = "eager"
    with torch.no_grad():
        ref = model(x, output_attentions=True).attentions
    model.config._attn_implementation = impl
    for i in range(2):
        probs: list[torch.Tensor] = []
        h = adapter.block(i).forward(h, contexts[i], probs)
        torch.testing.assert_close(probs[0], ref[i].float(), rtol=1e-5, atol=1e-6)
    assert model.config._attn_implementation == impl


# -- pruning ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("family", FAMILIES)
def test_zero_sparsity_is_exact(family):
    model = tiny(family)
    want = logits(model)
    assert torch.equal(logits(_prune(copy.deepcopy(model), sparsity=0.0).model), want)


@pytest.mark.parametrize("family", ["gemma3_text", "granite", "qwen2"])
def test_slicing_equals_masking(family):
    """Removing heads (one per KV group) and channels == zeroing their o_proj / down_proj columns."""
    model = tiny(family)
    masked = copy.deepcopy(model)
    block = get_adapter(model).block(2)
    hd = block.head_dim
    gone_heads, gone_channels = [1, 2], [0, 5, 17, 40]
    with torch.no_grad():
        m = get_adapter(masked).block(2)
        for h in gone_heads:
            m.attn_out().weight[:, h * hd:(h + 1) * hd] = 0
        m.ffn_out().weight[:, gone_channels] = 0
    block.slice_heads([h for h in range(block.n_heads) if h not in gone_heads])
    block.slice_ffn([c for c in range(block.n_channels) if c not in gone_channels])
    assert (block.n_heads, block.n_kv_heads, block.n_channels) == (2, 2, 92)
    torch.testing.assert_close(logits(model), logits(masked), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_prune_save_reload_generate(family, tmp_path):
    """Heads and channels go; the folder reloads with the same logits; cached generation == greedy argmax."""

    result = _prune(tiny(family), sparsity=0.25, head_split="paper", out=str(tmp_path / "o"))
    model = result.model
    shapes = result.report["shapes"]["layers"]
    assert any(s["num_attention_heads"] < 4 for s in shapes) and any(s["intermediate_size"] < 96 for s in shapes)
    assert all(s["num_key_value_heads"] == 2 for s in shapes)  # the GQA rule: KV heads are kept
    assert_reloads_and_generates(model, tmp_path / "o")


def assert_reloads_and_generates(model, folder) -> None:
    """``folder`` reloads (daprune.load and remote code) with ``model``'s logits; cached generation == greedy."""
    from transformers import AutoModelForCausalLM

    want = logits(model)
    reloaded, _ = daprune.load(folder)
    assert torch.equal(logits(reloaded), want)
    remote = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    assert torch.equal(logits(remote), want)
    prompt = ids(1, 6)
    out = model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                         do_sample=False)
    seq = prompt
    with torch.no_grad():
        for _ in range(4):
            seq = torch.cat([seq, model(seq).logits[:, -1:].argmax(-1)], 1)
    assert torch.equal(out, seq)


@pytest.mark.parametrize("family", ["gemma3_text", "llama"])
def test_uniform_prune_loads_in_vanilla_transformers(family, tmp_path):
    """Every block pruned to the same widths: the family's plain config, no remote code."""
    from transformers import AutoModelForCausalLM

    result = _prune(tiny(family), sparsity=0.1, layers="0:6", head_split="ffn-only", out=str(tmp_path / "o"))
    assert result.report["shapes"]["uniform"]
    assert not (tmp_path / "o" / "modeling_daprune.py").exists()
    vanilla = AutoModelForCausalLM.from_pretrained(tmp_path / "o").eval()
    assert torch.equal(logits(vanilla), logits(result.model))


@pytest.mark.parametrize("family", FAMILIES)
def test_streaming_equals_in_memory(family, tmp_path):
    tiny(family).save_pretrained(tmp_path / "src")
    streamed = _prune(str(tmp_path / "src"), out=str(tmp_path / "o"), streaming=True, head_split="paper")
    in_memory = _prune(tiny(family), head_split="paper")
    for a, b in zip(streamed.report["layers"], in_memory.report["layers"], strict=True):
        assert a["kept_heads"] == b["kept_heads"] and a["kept_channels"] == b["kept_channels"]
    state = in_memory.model.state_dict()
    for k, v in streamed.model.state_dict().items():
        assert torch.equal(v, state[k]), k


# -- multi-head attention and whole KV groups -------------------------------------------------------------------
def _silence_heads(model, block: int, heads: list[int]) -> None:
    """Zero these heads' o_proj columns: they add nothing, so any sound split removes exactly them first."""
    b = get_adapter(model).block(block)
    with torch.no_grad():
        for h in heads:
            b.attn_out().weight[:, h * b.head_dim:(h + 1) * b.head_dim] = 0


@pytest.mark.parametrize("split", ["auto", "paper"])
def test_multi_head_model_loses_heads(split):
    """MHA (every query head its own KV head) loses whole heads, q/k/v/o together, under both splits."""
    model = tiny("llama", heads=4, kv=4)
    for i in range(1, 5):
        _silence_heads(model, i, [1, 3])
    # tau 0: no pair counts as redundant (random tiny heads attend almost alike), so importance decides
    result = _prune(model, sparsity=0.3, head_split=split, tau=0.0)
    for row in result.report["layers"][1:5]:
        assert len(row["kept_heads"]) < 4, row
        if split == "auto":  # silent heads cost nothing: they are the ones removed
            assert set(row["kept_heads"]) <= {0, 2}
    block = get_adapter(result.model).block(1)
    assert block.n_heads == block.n_kv_heads < 4  # still multi-head attention
    assert result.model.model.layers[1].self_attn.num_key_value_groups == 1


def test_gqa_keeps_kv_heads_unless_kv_groups_is_asked():
    """GQA: query heads go evenly per group; --kv-groups also allows dropping a whole (silent) group."""
    base = tiny("llama", heads=4, kv=2)
    for i in range(1, 5):
        _silence_heads(base, i, [2, 3])  # the whole second KV group adds nothing
    plain = _prune(copy.deepcopy(base), sparsity=0.3, tau=0.0, channel_multiple=1)  # fine budget granularity
    grouped = _prune(copy.deepcopy(base), sparsity=0.3, kv_groups=True, tau=0.0, channel_multiple=1)
    assert all(s["num_key_value_heads"] == 2 for s in plain.report["shapes"]["layers"])
    for row in grouped.report["layers"][1:5]:
        assert row["kept_heads"] == [0, 1] and row["plan"]["kv_groups"] == 1, row
    assert all(s["num_key_value_heads"] == 1 for s in grouped.report["shapes"]["layers"][1:5])
    assert grouped.report["params"]["removed"] >= plain.report["params"]["removed"] * 0.99


def test_sparsity_basis_blocks_counts_block_parameters():
    """--sparsity-basis blocks removes a fraction of the decoder blocks' parameters, and reports both."""
    model = tiny("gemma3_text")
    block_params = sum(p.numel() for layer in model.model.layers for p in layer.parameters())
    total = sum(p.numel() for p in model.parameters())
    rep = _prune(model, sparsity=0.2, sparsity_basis="blocks").report["params"]
    assert rep["blocks_before"] == block_params and rep["before"] == total
    assert 0.2 <= rep["achieved_block_sparsity"] < 0.23
    assert rep["removed"] == rep["blocks_before"] - rep["blocks_after"]
    assert rep["achieved_sparsity"] == pytest.approx(rep["removed"] / total)


@pytest.mark.parametrize("batch_size", [5, 3])
def test_opt_ffn_statistics_count_every_token_in_any_batch_size(one_thread, batch_size):
    """OPT runs its FFN on [batch * seq, hidden]. The statistics used to slice that flat form by the batch's row
    count and so read the first few *tokens* of each batch (5 of 60 here); every token must count, whatever the
    batching: the Gram equals numpy's sum over all fc2 inputs of one forward."""
    from daprune.block_ops import copy_block
    from daprune.config import PruneConfig
    from daprune.criteria.base import get_criterion
    from daprune.hooks import capture
    from daprune.pipeline import BlockPruner
    from daprune.stores import ResidentStore

    adapter = get_adapter(tiny("opt"))
    block = adapter.block(1)
    x = torch.randn(5, 12, adapter.config.hidden_size, generator=torch.Generator().manual_seed(6))
    ctx = ResidentStore(adapter).layer_inputs(x.shape[1])[1]
    pruner = BlockPruner(PruneConfig(nsamples=5, batch_size=batch_size), get_criterion("second-moment"), None, 0.0)
    m = pruner.collect(block, copy_block(block), x, x, ctx, {"down_in": True})
    with torch.no_grad(), capture({"d": block.ffn_out()}) as got:
        block.forward(x, ctx)
    d_in, d_out = (t.double().numpy() for t in got["d"])
    assert d_in.shape[0] == 60 and m["down_in"].n == 60
    np.testing.assert_allclose(m["down_in"].gram.double().numpy(), d_in.T @ d_in, rtol=2e-4, atol=1e-5)
    np.testing.assert_allclose(m["down_in"].cross.double().numpy(), d_in.T @ d_out, rtol=2e-4, atol=1e-5)
