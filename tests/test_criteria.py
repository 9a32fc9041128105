"""Every baseline criterion on a hand-set one-block layer, checked against scores computed by hand.

The layer: hidden 4, 2 query heads of head_dim 2 sharing 1 KV head (GQA group size 2), 3 FFN channels.
    gate G = [[1,0,0,0],[0,2,0,0],[0,0,1,1]]       up U = [[1,1,0,0],[0,0,0,-3],[2,0,0,0]]
    down D columns: (1,0,0,2), (0,2,0,0), (0,1,0,-1)
    q rows: (1,0,0,0), (0,1,0,0) | (0,0,2,0), (0,0,0,-1)     (head 0 | head 1)
    o columns: (1,0,0,0), (0,-1,0,0) | (0,0,1,0), (0,0,1,2)
down_proj input, 4 tokens: (1,0,2), (1,2,0), (-1,0,2), (1,2,0)
    -> E[x^2] = (1, 2, 2), mean = (0.5, 1, 1), Var = (0.75, 1, 1), n = 4
o_proj input, 4 tokens: (1,0,0,1), (1,0,2,1), (1,2,0,-1), (1,2,2,-1)
    -> E[z^2] = (1, 2, 2, 1), mean = (1, 1, 1, 0), Var = (0, 1, 1, 1)
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CharTokenizer, tiny_model

from daprune.criteria.base import get_criterion
from daprune.models.adapter import get_adapter
from daprune.stats import BlockStats, Moments

G = [[1, 0, 0, 0], [0, 2, 0, 0], [0, 0, 1, 1]]
U = [[1, 1, 0, 0], [0, 0, 0, -3], [2, 0, 0, 0]]
D = [[1, 0, 0], [0, 2, 1], [0, 0, 0], [2, 0, -1]]
Q = [[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 2, 0], [0, 0, 0, -1]]
O = [[1, 0, 0, 0], [0, -1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 2]]
DOWN_IN = [[1, 0, 2], [1, 2, 0], [-1, 0, 2], [1, 2, 0]]
O_IN = [[1, 0, 0, 1], [1, 0, 2, 1], [1, 2, 0, -1], [1, 2, 2, -1]]


pytestmark = pytest.mark.usefixtures("one_thread")


def hand_block():
    model = tiny_model(layers=1, heads=2, kv=1, hidden=4, inter=3, vocab=16)
    block = get_adapter(model).block(0)
    with torch.no_grad():
        for lin, w in zip([*block.ffn_in(), block.ffn_out(), block.attn_in()[0], block.attn_out()],
                          [G, U, D, Q, O], strict=True):
            lin.weight.copy_(torch.tensor(w, dtype=torch.float32))
    return model, block


def hand_stats() -> BlockStats:
    down, o = Moments("down_in"), Moments("o_in")
    down.update(torch.tensor(DOWN_IN, dtype=torch.float32))
    o.update(torch.tensor(O_IN, dtype=torch.float32))
    return BlockStats(o_in=o, down_in=down)


def scores(name: str, stats: BlockStats | None = None, seed: int = 0):
    _, block = hand_block()
    crit = get_criterion(name, seed=seed)
    stats = stats or hand_stats()
    ffn = crit.ffn_scores(block, stats)
    try:
        heads = crit.head_scores(block, stats)
    except NotImplementedError:
        heads = None
    return ffn, heads


def close(a: torch.Tensor, b: list[float]) -> None:
    torch.testing.assert_close(a.double(), torch.tensor(b, dtype=torch.float64), rtol=1e-6, atol=1e-6)


def test_hand_moments():
    st = hand_stats()
    close(torch.diagonal(st.down_in.second), [1, 2, 2])
    close(torch.diagonal(st.down_in.cov), [0.75, 1, 1])
    close(st.o_in.mean, [1, 1, 1, 0])


FFN_IN = [[1, 0, 0, 1], [1, 2, 0, -1], [0, 1, 1, 0]]  # 3 tokens of the post-norm FFN input


def test_second_moment_hand():
    """Ours: ||D_j||^2 E[h_j^2] per channel; per head the mean energy of z_h W_o,h^T over the tokens."""
    ffn, heads = scores("second-moment")
    close(ffn, [5 * 1, 4 * 2, 2 * 2])
    # head 0 writes (z0, -z1, 0, 0): energies 1, 1, 5, 5; head 1 writes (0, 0, z2 + z3, 2 z3): 5, 13, 5, 5
    close(heads, [3, 7])


def _token_moments(w: list[int], centred: bool) -> float:
    """E[(w.x)^2] or Var(w.x) over the FFN_IN tokens, written out per token (independent of Moments)."""
    proj = [sum(a * b for a, b in zip(w, x, strict=True)) for x in FFN_IN]
    mean = sum(proj) / len(proj)
    second = sum(p * p for p in proj) / len(proj)
    return second - mean * mean if centred else second


@pytest.mark.parametrize("name,centred", [("paper", True), ("paper-uncentred", False), ("authors", True)])
def test_paper_scores_hand(name, centred):
    """The paper's SwiGLU product (centred Sigma), its uncentred variant, and the authors' early code."""
    st = hand_stats()
    st.ffn_in = Moments("ffn_in")
    st.ffn_in.update(torch.tensor(FFN_IN, dtype=torch.float32))
    ffn, _ = scores(name, st)
    d2 = [5, 4, 2]
    qg = [_token_moments(g, centred) for g in G]
    qu = [_token_moments(u, centred) for u in U]
    if name == "authors":  # ||D_j|| * silu(G_j' S G_j) * U_j' S U_j
        silu = [q / (1 + math.exp(-q)) for q in qg]
        expected = [math.sqrt(d) * a * u for d, a, u in zip(d2, silu, qu, strict=True)]
    else:  # (1/2 ||D_j||^2 U_j' S U_j) * (1/2 ||D_j||^2 G_j' S G_j)
        expected = [(0.5 * d * u) * (0.5 * d * g) for d, u, g in zip(d2, qu, qg, strict=True)]
    assert all(e != 0 for e in expected)  # the example separates the channels
    close(ffn, expected)


def test_l1():
    ffn, heads = scores("l1")
    close(ffn, [1 + 2 + 3, 2 + 3 + 2, 2 + 2 + 2])  # gate row + up row + down column
    close(heads, [(1 + 1) + (1 + 1), (2 + 1) + (1 + 3)])  # q rows + o columns


def test_l2():
    ffn, heads = scores("l2")
    close(ffn, [math.sqrt(1 + 2 + 5), math.sqrt(4 + 9 + 4), math.sqrt(2 + 4 + 2)])
    close(heads, [2.0, math.sqrt(4 + 1 + 1 + 5)])


def test_depth1_and_depth2():
    d1, h1 = scores("depth1")
    close(d1, [math.sqrt(3), math.sqrt(13), math.sqrt(6)])  # ||[G_j, U_j]||
    assert h1 is None
    d2, _ = scores("depth2")
    close(d2, [math.sqrt(3) * math.sqrt(5), math.sqrt(13) * 2, math.sqrt(6) * math.sqrt(2)])


def test_wanda_sp():
    ffn, heads = scores("wanda-sp")
    # mean_i |D_ij| * sqrt(n E[x_j^2]), n = 4 tokens
    close(ffn, [0.75 * 2, 0.5 * math.sqrt(8), 0.5 * math.sqrt(8)])
    # o columns: mean |O_ij| = 1/4, 1/4, 1/4, 3/4; ||z_j|| = 2, sqrt 8, sqrt 8, 2
    close(heads, [0.25 * 2 + 0.25 * math.sqrt(8), 0.25 * math.sqrt(8) + 0.75 * 2])


def test_flap_scores():
    ffn, heads = scores("flap")
    close(ffn, [0.75 * 5, 1 * 4, 1 * 2])  # Var(x_j) * ||D[:, j]||^2
    close(heads, [0 * 1 + 1 * 1, 1 * 1 + 1 * 5])
    _, block = hand_block()
    cols = get_criterion("flap").head_column_scores(block, hand_stats())
    close(cols, [0, 1, 1, 25])  # FLAP squares the attention metric before standardising


def test_flap_bias_compensation_hand():
    _, block = hand_block()
    crit, st = get_criterion("flap"), hand_stats()
    crit.after_ffn_prune(block, [0], st)  # D[:, 0] * mean_0 = (1,0,0,2) * 0.5
    close(block.ffn_out().bias, [0.5, 0, 0, 1])
    crit.after_ffn_prune(block, [2], st)  # adds (0,1,0,-1) * 1
    close(block.ffn_out().bias, [0.5, 1, 0, 0])
    crit.after_head_prune(block, [0], st)  # columns 0, 1 with means 1, 1
    close(block.attn_out().bias, [1, -1, 0, 0])
    nocomp = get_criterion("flap", compensate=False)
    _, block2 = hand_block()
    nocomp.after_ffn_prune(block2, [0], st)
    assert block2.ffn_out().bias is None


def taylor_stats() -> BlockStats:
    st = hand_stats()
    o_grad = torch.ones(4, 4)
    o_grad[3, 3] = -1.0  # salience of o column 3 becomes (0,0,1,-2): E1 3, vector |1-2| = 1
    down_grad = torch.ones(4, 3)
    st.grads = {"gate": torch.ones(3, 4), "up": -torch.ones(3, 4), "down": down_grad, "q": torch.ones(4, 4),
                "k": torch.ones(2, 4), "v": torch.ones(2, 4), "o": o_grad}
    return st


def test_taylor_e1():
    ffn, heads = scores("taylor-e1", taylor_stats())
    close(ffn, [1 + 2 + 3, 2 + 3 + 2, 2 + 2 + 2])  # sum |w g|: salience = (G, -U, D) here
    close(heads, [(1 + 1) + (1 + 1), (2 + 1) + (1 + 3)])


def test_taylor_vector():
    ffn, heads = scores("taylor-vector", taylor_stats())
    # per weight vector |sum w g|: gate rows 1,2,2; up rows |-(2)|, |-(-3)|, |-(2)|; down columns 3, 2, |1-1|=0
    close(ffn, [1 + 2 + 3, 2 + 3 + 2, 2 + 2 + 0])
    # q rows |sum|: 1,1 | 2,1 ; o columns |sum|: 1,1 | 1,|1-2|=1
    close(heads, [(1 + 1) + (1 + 1), (2 + 1) + (1 + 1)])


def test_taylor_needs_gradients():
    from daprune.errors import ConfigError

    with pytest.raises(ConfigError, match="gradients"):
        scores("taylor-e1", hand_stats())


def test_random_is_seeded_per_block():
    model = tiny_model(layers=2)
    adapter = get_adapter(model)
    crit = get_criterion("random", seed=3)
    a0 = crit.ffn_scores(adapter.block(0), BlockStats())
    assert torch.equal(a0, get_criterion("random", seed=3).ffn_scores(adapter.block(0), BlockStats()))
    assert not torch.equal(a0, crit.ffn_scores(adapter.block(1), BlockStats()))
    assert not torch.equal(a0, get_criterion("random", seed=4).ffn_scores(adapter.block(0), BlockStats()))
    h = crit.head_scores(adapter.block(0), BlockStats())
    assert a0.shape == (96,) and h.shape == (6,) and float(a0.min()) >= 0 and float(a0.max()) < 1
    assert get_criterion("random").data_free and get_criterion("l2").data_free


def test_collect_gradients_matches_autograd():
    import torch.nn.functional as F

    from daprune.criteria.taylor import collect_gradients

    model = tiny_model(layers=2)
    model.model.embed_tokens.weight.requires_grad_(False)  # a flag that must survive the call
    ids = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    grads = collect_gradients(model, get_adapter(model), ids, batch_size=2, progress=False)
    assert sorted(grads) == [0, 1] and sorted(grads[1]) == sorted(["q", "k", "v", "o", "gate", "up", "down"])
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())
    assert model.model.layers[0].mlp.down_proj.weight.requires_grad
    # reference: one backward of the mean NLL over all windows
    logits = model(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    layers = model.model.layers
    ref = torch.autograd.grad(loss, [layers[1].mlp.down_proj.weight, layers[0].self_attn.q_proj.weight])
    torch.testing.assert_close(grads[1]["down"], ref[0], rtol=1e-4, atol=1e-7)
    torch.testing.assert_close(grads[0]["q"], ref[1], rtol=1e-4, atol=1e-7)


def _tiny_family(family: str):
    import test_families_extra

    return tiny_model(layers=3) if family == "llama" else test_families_extra.tiny(family)


def _flags(model) -> dict[str, bool]:
    return {n: p.requires_grad for n, p in model.named_parameters()}


@pytest.mark.parametrize("family,activations", [("llama", "disk"), ("phi3", "device"), ("gpt2", "device")])
def test_streamed_gradients_equal_the_whole_model_pass(family, activations, tmp_path):
    """Block by block (fused Phi-3 and transposed GPT-2 blocks in canonical form, block inputs in files for llama)
    the gradients are the whole-model pass's (itself checked against autograd above); each block's dict is handed
    over once, last block first, before the pass has gone two blocks further down, and every flag is as before."""
    from daprune.activations import Activations
    from daprune.criteria.taylor import collect_gradients, streamed_gradients
    from daprune.stores import ResidentStore

    model = _tiny_family(family)
    adapter = get_adapter(model)
    first = adapter.block(0)
    first.to_canonical()
    first.attn_out().weight.requires_grad_(False)  # flags that must survive both passes
    first.to_native()
    model.get_input_embeddings().weight.requires_grad_(False)
    flags = _flags(model)
    ids = torch.randint(0, 128, (5, 12), generator=torch.Generator().manual_seed(0))
    want = collect_gradients(model, adapter, ids, batch_size=2, progress=False)
    assert _flags(model) == flags
    store = ResidentStore(adapter, Activations(activations, torch.device("cpu"), tmp_path / "acts"))
    events: list[tuple[str, int]] = []
    load = store.load
    store.load = lambda i: events.append(("load", i)) or load(i)
    got: dict[int, dict[str, torch.Tensor]] = {}

    def take(i: int, grads: dict[str, torch.Tensor]) -> None:
        assert i not in got
        events.append(("take", i))
        got[i] = grads

    streamed_gradients(adapter, store, ids, take, batch_size=2, progress=False)
    n = adapter.n_layers
    assert [i for kind, i in events if kind == "take"] == list(reversed(range(n)))
    loads = [pos for pos, (kind, _) in enumerate(events) if kind == "load"][n:]  # after the forward's n loads
    assert [events[pos][1] for pos in loads] == list(reversed(range(n)))
    for i in range(2, n):  # block i's gradients are handed over before block i - 2 is loaded again
        assert events.index(("take", i)) < loads[n - 1 - (i - 2)]
    assert sorted(got) == sorted(want) == list(range(n))
    for i in want:
        assert sorted(got[i]) == sorted(want[i])
        for role, g in want[i].items():
            assert got[i][role].dtype == torch.float32
            torch.testing.assert_close(got[i][role], g, rtol=1e-4, atol=1e-7)
    for i in range(n):  # the resident store leaves blocks canonical; natively every flag is as it was
        adapter.block(i).to_native()
    assert _flags(model) == flags and all(p.grad is None for p in model.parameters())


def test_streamed_taylor_prune_equals_the_in_memory_one(tmp_path):
    """``prune(streaming=True)`` with taylor-e1 for FFN channels and heads (selection by score): the gradients come
    block by block and from the work folder's files, yet the kept heads and channels are the in-memory run's and
    the weights equal up to float rounding."""
    from transformers import AutoModelForCausalLM

    from daprune.api import prune

    tiny_model(layers=4).save_pretrained(tmp_path / "src")
    common = dict(sparsity=0.3, calibration="random", nsamples=8, seqlen=24, layers="0:", ffn_criterion="taylor-e1",
                  head_criterion="taylor-e1", selection="score", head_split="paper", progress=False)
    streamed = prune(model=str(tmp_path / "src"), out=str(tmp_path / "o"), streaming=True, **common)
    in_memory = prune(model=AutoModelForCausalLM.from_pretrained(tmp_path / "src"), tokenizer=CharTokenizer(),
                      **common)
    assert streamed.report["execution"]["streaming"] and streamed.report["timings"]["gradients_s"] > 0
    assert all(len(r["kept_heads"]) < 6 and r["kept_channels"] < 96 for r in streamed.report["layers"])
    for a, b in zip(streamed.report["layers"], in_memory.report["layers"], strict=True):
        assert a["kept_heads"] == b["kept_heads"] and a["kept_channels"] == b["kept_channels"]
    assert streamed.report["kept_channels"] == in_memory.report["kept_channels"]
    state = in_memory.model.state_dict()
    streamed_state = streamed.model.state_dict()
    assert sorted(streamed_state) == sorted(state)
    for k, v in streamed_state.items():
        torch.testing.assert_close(v, state[k], rtol=1e-4, atol=1e-5)


def test_taylor_prune_end_to_end():
    from daprune.api import prune

    model = tiny_model(layers=4)
    res = prune(model=model, tokenizer=CharTokenizer(), calibration="random", nsamples=8, seqlen=24, layers="1:-1",
                ffn_criterion="taylor-vector", head_criterion="taylor-e1", sparsity=0.2, progress=False)
    assert res.report["params"]["achieved_sparsity"] >= 0.2
    assert "gradients_s" in res.report["timings"]
    assert all(p.grad is None for p in model.parameters())


def test_taylor_vector_keeps_the_top_channels_by_autograd_salience():
    """End to end, FFN-only, no recovery: the kept channels are the top ones by sum over the channel's weight
    vectors of |sum w * dL/dw|, with L the mean NLL of the dense model on the calibration windows (autograd here)."""
    import torch.nn.functional as F

    from daprune.api import prune

    ref = tiny_model(layers=4)
    ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))  # calibration="random", seed 0
    logits = ref(input_ids=ids).logits
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
    mlps = [ref.model.layers[i].mlp for i in (1, 2)]
    lins = [m for mlp in mlps for m in (mlp.gate_proj.weight, mlp.up_proj.weight, mlp.down_proj.weight)]
    grads = torch.autograd.grad(loss, lins)
    res = prune(model=tiny_model(layers=4), tokenizer=CharTokenizer(), calibration="random", nsamples=8, seqlen=24,
                layers="1:-1", ffn_criterion="taylor-vector", head_split="ffn-only", sparsity=0.2, progress=False)
    for n, i in enumerate((1, 2)):
        (gw, gg), (uw, ug), (dw, dg) = [(lins[3 * n + k].double(), grads[3 * n + k].double()) for k in range(3)]
        score = (gw * gg).sum(1).abs() + (uw * ug).sum(1).abs() + (dw * dg).sum(0).abs()
        kept = res.report["kept_channels"][i]
        assert kept == sorted(torch.topk(score, len(kept)).indices.tolist()), i


# -- FLAP compensation and loading ------------------------------------------------------------------------
def _ffn_io(block, x: torch.Tensor) -> tuple[torch.Tensor, Moments]:
    from daprune.hooks import capture

    mom = Moments("down_in")
    with capture({"d": block.ffn_out()}) as got:
        y = block.ffn_module()(x)
    mom.update(got["d"][0])
    return y, mom


@torch.no_grad()
def test_flap_compensation_lowers_ffn_error():
    from daprune.block_ops import copy_block

    model = tiny_model(layers=1)
    block = get_adapter(model).block(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(256, 48, generator=g) + 1.5  # non-zero-mean input: removed channels have a non-zero mean
    y, mom = _ffn_io(block, x)
    st = BlockStats(down_in=mom)
    crit = get_criterion("flap")
    removed = torch.sort(crit.ffn_scores(block, st)).indices[:48].tolist()
    keep = sorted(set(range(96)) - set(removed))
    errs = {}
    for comp in (True, False):
        b = copy_block(block)
        get_criterion("flap", compensate=comp).after_ffn_prune(b, removed, st)
        b.slice_ffn(keep)
        errs[comp] = float((b.ffn_module()(x) - y).norm() / y.norm())
        if comp:
            got = b.ffn_module()(x).double()
    assert errs[True] < 0.9 * errs[False], errs
    # exactly: the removed channels' output is replaced by its mean, D_R E[h_R] (h written out in float64 here)
    mlp = model.model.layers[0].mlp
    x64 = x.double()
    h = torch.nn.functional.silu(x64 @ mlp.gate_proj.weight.double().T) * (x64 @ mlp.up_proj.weight.double().T)
    d = mlp.down_proj.weight.double()
    want = h[:, keep] @ d[:, keep].T + d[:, removed] @ h[:, removed].mean(0)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("schedule", ["uniform", "adaptive"])
def test_flap_pruned_model_reloads(tmp_path, schedule):
    """FLAP adds o/down biases; the saved model must reload (vanilla transformers when uniform) to the same logits."""
    from transformers import AutoModelForCausalLM

    from daprune.api import prune
    from daprune.loader import load_pruned

    model = tiny_model(layers=3)
    res = prune(model=model, tokenizer=CharTokenizer(), calibration="random", nsamples=8, seqlen=24, layers="0:",
                ffn_criterion="flap", head_criterion="flap", schedule=schedule, sparsity=0.2, progress=False)
    assert model.config.mlp_bias and model.config.attention_bias == bool(
        any(res.model.model.layers[i].self_attn.o_proj.bias is not None for i in range(3)))
    for layer in model.model.layers:  # every block has the biases its config promises
        assert all(lin.bias is not None for lin in (layer.mlp.gate_proj, layer.mlp.up_proj, layer.mlp.down_proj))
    assert float(model.model.layers[1].mlp.down_proj.bias.detach().abs().sum()) > 0
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(2))
    ref = model(ids).logits
    model.save_pretrained(tmp_path)
    if schedule == "uniform":
        assert not getattr(model.config, "daprune_layers", None)
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    else:
        loaded, _ = load_pruned(tmp_path)
    torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=1e-5)


# -- adaptive schedule ------------------------------------------------------------------------------------
def test_standardise_hand():
    from daprune.adaptive import standardise

    close(standardise(torch.tensor([1.0, 2.0, 3.0])), [-1, 0, 1])  # mean 2, unbiased std 1
    close(standardise(torch.tensor([5.0, 5.0])), [0, 0])


def test_head_units_gqa_hand():
    from daprune.adaptive import head_units

    model = tiny_model(layers=1, heads=6, kv=2)  # groups {0,1,2}, {3,4,5}
    block = get_adapter(model).block(0)
    z = torch.tensor([0.5, -1.0, 2.0, 0.0, 3.0, -2.0])
    units = head_units(block, z)
    # unit 1 = least important head of each group: (-1.0, -2.0) -> mean -1.5; unit 2 = second: (0.5, 0.0) -> 0.25
    assert [u.rank for u in units] == [1, 2]  # at least one head per group stays
    close(torch.tensor([u.score for u in units]), [-1.5, 0.25])


def test_select_units_hand():
    from daprune.adaptive import Unit, select_units

    units = [Unit(-1.0, "channel", 0, 1, 10), Unit(0.5, "channel", 0, 2, 10), Unit(-0.5, "head", 0, 1, 40),
             Unit(-2.0, "channel", 1, 1, 10), Unit(0.1, "channel", 1, 2, 10)]
    # ascending: -2.0 (b1 ch, 10), -1.0 (b0 ch, 20), -0.5 (b0 head, 60) -> stop at >= 55
    assert select_units(units, 55) == {(1, "channel"): 1, (0, "channel"): 1, (0, "head"): 1}


def test_adaptive_plans_meet_budget():
    from daprune.adaptive import adaptive_plans
    from daprune.config import PruneConfig
    from daprune.schedule import channel_params, head_unit_params
    from daprune.stores import ResidentStore

    model = tiny_model(layers=5)
    adapter = get_adapter(model)
    ids = torch.randint(0, 128, (8, 24), generator=torch.Generator().manual_seed(0))
    cfg = PruneConfig(channel_multiple=8, batch_size=4)
    store = ResidentStore(adapter)
    xp, contexts = store.embed(ids, 4), store.layer_inputs(24)
    target = 30_000.0
    before = [p.clone() for p in model.parameters()]
    for ffn, head in (("flap", "flap"), ("second-moment", "second-moment"), ("l2", None)):
        crit_h = get_criterion(head) if head else None
        plans = adaptive_plans(adapter, xp, contexts, range(1, 4), target, get_criterion(ffn),
                               crit_h, cfg)
        assert sorted(plans) == [1, 2, 3]
        assert sum(p.params for p in plans.values()) >= target
        for i, p in plans.items():
            b = adapter.block(i)
            assert p.params == p.heads_per_group * head_unit_params(b) + p.channels * channel_params(b)
            assert p.heads_per_group <= b.group_size - 1 and (head or p.heads_per_group == 0)
            kept = b.n_channels - p.channels
            assert kept >= 8 and kept % 8 == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))  # nothing pruned


def test_adaptive_rejects_gradient_criteria():
    from daprune.api import prune
    from daprune.errors import ConfigError

    with pytest.raises(ConfigError, match="adaptive"):
        prune(model=tiny_model(layers=3), tokenizer=CharTokenizer(), calibration="random", nsamples=8, seqlen=24,
              layers="1:-1", ffn_criterion="taylor-e1", head_criterion="taylor-e1", schedule="adaptive",
              progress=False)


@pytest.mark.slow
def test_flap_smollm_reloads_with_vanilla_transformers(smollm, tmp_path):
    """Real model: FLAP's compensation biases survive save_pretrained -> vanilla from_pretrained."""
    import copy

    from transformers import AutoModelForCausalLM

    from daprune.api import prune

    model, tok, _ = smollm
    res = prune(model=copy.deepcopy(model), tokenizer=tok, calibration="random", nsamples=8, seqlen=128, layers="0:",
                ffn_criterion="flap", head_criterion="flap", head_split="paper", sparsity=0.1, progress=False)
    pruned = res.model
    assert pruned.config.mlp_bias and not getattr(pruned.config, "daprune_layers", None)
    ids = torch.randint(0, 1000, (1, 32), generator=torch.Generator().manual_seed(0))
    ref = pruned(ids).logits
    pruned.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(loaded(ids).logits, ref, rtol=0, atol=1e-4)
