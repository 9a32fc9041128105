"""GGUF export: metadata, per-layer arrays, tensor shapes and values read back with gguf.GGUFReader.

Fast tests use a tiny random Llama with a tiny byte-level BPE tokenizer; the llama.cpp tests (slow, and
skipped without llama_cpp) run the real pruned SmolLM2 in llama.cpp and compare with transformers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import tiny_model

gguf = pytest.importorskip("gguf")


def bpe_tokenizer(vocab: int = 128, pre: str = "gpt-2", pad: bool = False):
    """A saveable byte-level BPE tokenizer (ids 0..vocab-1) with BOS/EOS specials, built offline, that splits words
    as GPT-2 (``pre="whitespace"``: on word boundaries, which llama.cpp has no name for). ``pad``: ``<unk>`` pads,
    so that transformers' Qwen2Tokenizer adds no pad token of its own (a 129th) when the folder is loaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = [chr(c) for c in range(ord("a"), ord("z") + 1)]
    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{t: 3 + i for i, t in enumerate(base)}}
    merges = [("a", "b"), ("c", "d")]
    for a, b in merges:
        words[a + b] = len(words)
    while len(words) < vocab:
        words[f"x{len(words)}"] = len(words)
    tok = Tokenizer(models.BPE(words, merges, unk_token="<unk>"))
    tok.pre_tokenizer = (pre_tokenizers.ByteLevel(add_prefix_space=False) if pre == "gpt-2"  # llama.cpp's "gpt-2"
                         else pre_tokenizers.Whitespace())
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   **({"pad_token": "<unk>"} if pad else {}))
    fast.add_special_tokens({"additional_special_tokens": []})
    return fast


def save(model, folder: Path, config_extra: dict | None = None, pad: bool = False) -> Path:
    model.save_pretrained(folder)
    bpe_tokenizer(model.config.vocab_size, pad=pad).save_pretrained(folder)
    if config_extra:
        cfg = json.loads((folder / "config.json").read_text())
        cfg.update(config_extra)
        (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def shrink(model, keep_heads: dict[int, list[int]], keep_ffn: dict[int, list[int]]):
    """Slice blocks by hand (GQA: same query heads kept in every KV group) so shapes differ per block."""
    cfg = model.config
    hd = cfg.head_dim
    for i, heads in keep_heads.items():
        attn = model.model.layers[i].self_attn
        rows = torch.cat([torch.arange(h * hd, (h + 1) * hd) for h in heads])
        q, o = attn.q_proj, attn.o_proj
        attn.q_proj = torch.nn.Linear(q.in_features, len(rows), bias=False)
        attn.q_proj.weight.data = q.weight.data[rows].clone()
        attn.o_proj = torch.nn.Linear(len(rows), o.out_features, bias=False)
        attn.o_proj.weight.data = o.weight.data[:, rows].clone()
        attn.num_key_value_groups = len(heads) // cfg.num_key_value_heads
    for i, chans in keep_ffn.items():
        mlp = model.model.layers[i].mlp
        idx = torch.tensor(chans)
        for name in ("gate_proj", "up_proj"):
            old = getattr(mlp, name)
            new = torch.nn.Linear(old.in_features, len(idx), bias=False)
            new.weight.data = old.weight.data[idx].clone()
            setattr(mlp, name, new)
        old = mlp.down_proj
        mlp.down_proj = torch.nn.Linear(len(idx), old.out_features, bias=False)
        mlp.down_proj.weight.data = old.weight.data[:, idx].clone()
    return model


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items()}


def tensor(reader, name: str) -> np.ndarray:
    """A tensor back in numpy's [rows, cols] order, dequantized to float32."""
    from gguf.quants import dequantize

    t = next(t for t in reader.tensors if t.name == name)
    data = dequantize(t.data, t.tensor_type)
    return np.asarray(data, dtype=np.float32).reshape([int(x) for x in reversed(t.shape)])


def hf_to_meta_rows(n_rows: int, n_head: int) -> list[int]:
    """For each GGUF row, the HF row it holds: per head, HF rows j and d/2 + j become adjacent rows 2j, 2j+1."""
    d = n_rows // n_head
    order = []
    for h in range(n_head):
        for j in range(d // 2):
            order += [h * d + j, h * d + d // 2 + j]
    return order


@pytest.fixture
def uniform_folder(tmp_path, one_thread):
    return save(tiny_model(layers=3, heads=4, kv=2, hidden=32, inter=64), tmp_path / "uniform")


@pytest.fixture
def per_layer_folder(tmp_path, one_thread):
    model = tiny_model(layers=3, heads=4, kv=2, hidden=32, inter=64)
    # block 1: one query head per KV group kept (heads 0 and 2); block 2: 40 of 64 FFN channels
    shrink(model, {1: [0, 2]}, {2: list(range(0, 64, 8)) + list(range(1, 64, 2))[:32]})
    layers = [{"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64},
              {"num_attention_heads": 2, "num_key_value_heads": 2, "intermediate_size": 64},
              {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 40}]
    return save(model, tmp_path / "per-layer", {"daprune_layers": layers}), model


def test_uniform_llama_metadata_and_values(uniform_folder, tmp_path):
    from daprune.export import export_gguf

    out = tmp_path / "m.gguf"
    res = export_gguf(uniform_folder, out, outtype="f32")
    assert res.arch == "llama" and res.tokenizer_source == "tokenizer.json"
    r = gguf.GGUFReader(out)
    f = fields(r)
    assert f["general.architecture"] == "llama"
    assert (f["llama.block_count"], f["llama.embedding_length"], f["llama.feed_forward_length"]) == (3, 32, 64)
    assert (f["llama.attention.head_count"], f["llama.attention.head_count_kv"]) == (4, 2)
    assert f["llama.attention.key_length"] == 8 and f["llama.rope.dimension_count"] == 8
    assert f["general.file_type"] == 0
    # tokenizer metadata rebuilt from tokenizer.json
    assert f["tokenizer.ggml.model"] == "gpt2" and len(f["tokenizer.ggml.tokens"]) == 128
    assert f["tokenizer.ggml.pre"] == "gpt-2"
    assert f["tokenizer.ggml.tokens"][:3] == ["<unk>", "<s>", "</s>"] and f["tokenizer.ggml.merges"] == ["a b", "c d"]
    assert f["tokenizer.ggml.bos_token_id"] == 1 and f["tokenizer.ggml.eos_token_id"] == 2
    model = torch.nn.Module()
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(uniform_folder)
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    names = {t.name for t in r.tensors}
    assert "output.weight" in names and len(names) == 3 + 9 * 3  # embd, norm, head + 9 per block
    np.testing.assert_array_equal(tensor(r, "token_embd.weight"), sd["model.embed_tokens.weight"])
    np.testing.assert_array_equal(tensor(r, "blk.2.ffn_down.weight"), sd["model.layers.2.mlp.down_proj.weight"])
    np.testing.assert_array_equal(tensor(r, "blk.0.attn_v.weight"), sd["model.layers.0.self_attn.v_proj.weight"])
    # q/k: rotary permutation, row by row
    q = sd["model.layers.1.self_attn.q_proj.weight"]
    np.testing.assert_array_equal(tensor(r, "blk.1.attn_q.weight"), q[hf_to_meta_rows(32, 4)])
    k = sd["model.layers.1.self_attn.k_proj.weight"]
    np.testing.assert_array_equal(tensor(r, "blk.1.attn_k.weight"), k[hf_to_meta_rows(16, 2)])


def test_transformers_reads_the_uniform_gguf_back_to_the_same_logits(uniform_folder, tmp_path):
    """transformers' own GGUF loader undoes llama.cpp's q/k layout: equal logits prove the round trip."""
    from transformers import AutoModelForCausalLM

    from daprune.export import export_gguf

    export_gguf(uniform_folder, tmp_path / "m.gguf", outtype="f32")
    ref = AutoModelForCausalLM.from_pretrained(uniform_folder).eval()
    back = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="m.gguf", dtype=torch.float32).eval()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)


def test_convert_gguf_caches_a_loadable_folder_atomically(uniform_folder, tmp_path):
    """A GGUF given as --model becomes a cached safetensors folder: the same logits as the model it came from,
    another account can read it (umask 022), an entry left for another file version is replaced, and the
    leftovers of a conversion killed half-way (a dead process's temp folder) are removed."""
    import os
    import subprocess
    import sys

    from transformers import AutoModelForCausalLM

    from daprune.atomic import owner_tag
    from daprune.export import export_gguf
    from daprune.models.loading import convert_gguf

    export_gguf(uniform_folder, tmp_path / "m.gguf", outtype="f32")
    cache, name = tmp_path / "cache", "tiny"
    target = cache / "models" / name
    target.mkdir(parents=True)
    (target / "daprune_source.json").write_text(json.dumps({"key": "another-version"}))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    host = owner_tag().split("-")[1]
    stale = target.parent / f".{name}.tmp-{int(dead.stdout)}-{host}-x"
    stale.mkdir()
    old = os.umask(0o022)
    try:
        got = convert_gguf(tmp_path / "m.gguf", cache, name)
    finally:
        os.umask(old)
    assert got == target and not stale.exists()
    assert json.loads((target / "daprune_source.json").read_text())["key"] != "another-version"
    assert sorted(p.name for p in target.parent.iterdir()) == [f".{name}.lock", name]  # no temp or old folders
    assert (target.stat().st_mode & 0o777) == 0o755 and ((target / "config.json").stat().st_mode & 0o777) == 0o644
    ref = AutoModelForCausalLM.from_pretrained(uniform_folder).eval()
    back = AutoModelForCausalLM.from_pretrained(target).eval()
    ids = torch.randint(0, 128, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, ref(ids).logits, rtol=1e-5, atol=1e-5)
    mtime = (target / "daprune_source.json").stat().st_mtime_ns
    assert convert_gguf(tmp_path / "m.gguf", cache, name) == target  # cached: not converted again
    assert (target / "daprune_source.json").stat().st_mtime_ns == mtime


def test_per_layer_model_uses_deci_with_per_layer_arrays(per_layer_folder, tmp_path):
    from daprune.export import export_gguf

    folder, model = per_layer_folder
    out = tmp_path / "d.gguf"
    res = export_gguf(folder, out, outtype="f16")
    assert res.arch == "deci"
    r = gguf.GGUFReader(out)
    f = fields(r)
    assert f["general.architecture"] == "deci" and f["general.file_type"] == 1
    assert f["deci.attention.head_count"] == [4, 2, 4]
    assert f["deci.attention.head_count_kv"] == [2, 2, 2]
    assert f["deci.feed_forward_length"] == [64, 64, 40]
    assert f["deci.attention.key_length"] == 8 and f["deci.attention.value_length"] == 8
    shapes = {t.name: [int(x) for x in t.shape] for t in r.tensors}  # GGUF order: [cols, rows]
    assert shapes["blk.1.attn_q.weight"] == [32, 16] and shapes["blk.1.attn_output.weight"] == [16, 32]
    assert shapes["blk.2.ffn_gate.weight"] == [32, 40] and shapes["blk.2.ffn_down.weight"] == [40, 32]
    assert next(t for t in r.tensors if t.name == "blk.0.attn_norm.weight").tensor_type == gguf.GGMLQuantizationType.F32
    q1 = model.model.layers[1].self_attn.q_proj.weight.detach().numpy()
    got = tensor(r, "blk.1.attn_q.weight")
    np.testing.assert_allclose(got, q1[hf_to_meta_rows(16, 2)].astype(np.float16), rtol=0, atol=0)
    down = model.model.layers[2].mlp.down_proj.weight.detach().numpy()
    np.testing.assert_array_equal(tensor(r, "blk.2.ffn_down.weight"), down.astype(np.float16).astype(np.float32))


def test_q8_0_and_bf16_types(per_layer_folder, tmp_path):
    from daprune.export import export_gguf

    folder, model = per_layer_folder
    res = export_gguf(folder, tmp_path / "q.gguf", outtype="q8_0")
    r = gguf.GGUFReader(tmp_path / "q.gguf")
    types = {t.name: t.tensor_type for t in r.tensors}
    assert types["blk.0.ffn_up.weight"] == gguf.GGMLQuantizationType.Q8_0  # rows of 32: whole blocks
    assert types["blk.2.ffn_down.weight"] == gguf.GGMLQuantizationType.F16  # rows of 40: not whole blocks
    # inputs of 16 (two heads of 8) and 40 channels are not whole blocks either
    assert res.fallback_f16 == ["blk.1.attn_output.weight", "blk.2.ffn_down.weight"]
    up = model.model.layers[0].mlp.up_proj.weight.detach().numpy()
    got = tensor(r, "blk.0.ffn_up.weight")
    # q8_0 by its definition: per 32-value block d = max|x| / 127 (stored as f16), q = round(x / d) in int8
    blocks = up.reshape(-1, 32).astype(np.float32)
    d = np.abs(blocks).max(1, keepdims=True) / 127
    q = np.round(blocks / d)
    expected = (q * d.astype(np.float16).astype(np.float32)).reshape(up.shape)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9)
    assert np.abs(got - up).max() < 0.6 * d.max()
    export_gguf(folder, tmp_path / "b.gguf", outtype="bf16")
    rb = gguf.GGUFReader(tmp_path / "b.gguf")
    assert fields(rb)["general.file_type"] == 32
    ref = model.model.layers[0].mlp.up_proj.weight.detach().to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(tensor(rb, "blk.0.ffn_up.weight"), ref)


def test_tokenizer_copied_from_a_source_gguf(uniform_folder, tmp_path):
    """tokenizer.* keys are copied with their values and types when a source GGUF is given."""
    from daprune.export import export_gguf

    src = tmp_path / "src.gguf"
    w = gguf.GGUFWriter(src, arch="llama")
    w.add_tokenizer_model("gpt2")
    w.add_token_list([f"t{i}" for i in range(128)])
    w.add_token_types([1] * 128)
    w.add_bos_token_id(5)
    w.add_chat_template("{{ x }}")
    w.add_tensor("dummy", np.zeros(2, dtype=np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    res = export_gguf(uniform_folder, tmp_path / "m.gguf", tokenizer_gguf=src)
    f = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert res.tokenizer_source == str(src)
    assert f["tokenizer.ggml.tokens"][7] == "t7" and f["tokenizer.ggml.bos_token_id"] == 5
    assert f["tokenizer.chat_template"] == "{{ x }}" and "tokenizer.ggml.merges" not in f


def test_unsupported_family_is_one_clear_error(tmp_path, one_thread):
    from test_families_extra import tiny as tiny_extra

    from daprune.errors import DapruneError
    from daprune.export import export_gguf

    folder = save(tiny_extra("phi3"), tmp_path / "phi3")
    with pytest.raises(DapruneError, match="no GGUF export for model type 'phi3'"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_per_layer_family_without_graph_points_to_uniform():
    """llama.cpp reads per-layer widths only in its Llama-shaped deci graph: a per-layer Qwen3 or Gemma-3 is refused;
    Qwen2 (Llama with q/k/v biases) goes to deci, and to llama where its own graph cannot hold uniform blocks
    (heads narrower than the hidden size, o_proj / MLP biases)."""
    from daprune.export import arch

    shapes = [arch.LayerShape(4, 2, 64), arch.LayerShape(2, 2, 64)]
    for family in ("qwen3", "gemma3_text"):
        with pytest.raises(arch.ExportError, match="--layout uniform"):
            arch.choose_arch(family, shapes)
    assert arch.choose_arch("qwen2", shapes, 48, 12) == "deci"
    assert arch.choose_arch("qwen2", [arch.LayerShape(4, 2, 64)] * 3, 48, 12) == "qwen2"
    assert arch.choose_arch("qwen2", [arch.LayerShape(3, 2, 64)] * 3, 48, 12) == "llama"
    assert arch.choose_arch("qwen2", [arch.LayerShape(4, 2, 64)] * 3, 48, 12, level2_biases=True) == "llama"
    assert arch.choose_arch("qwen3", [arch.LayerShape(3, 2, 64)] * 3, 48, 12) == "qwen3"


def _tiny_family(family: str, **flags):
    """A tiny random Qwen2 / Qwen3 / Gemma-3 / Llama (Gemma-3 laid out as llama.cpp's gemma3 graph assumes: a
    global layer every 6th, no soft-capping; a window of 8 so 30-token texts use it); ``flags`` go into the config
    (``attention_bias=True``), and every bias is random."""
    from test_families import randomise_norms_and_biases, tiny

    if family != "gemma3_text":
        return tiny(family, layers=4, **flags)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.for_model("gemma3_text", vocab_size=128, hidden_size=48, intermediate_size=96,
                                  num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2, head_dim=12,
                                  max_position_embeddings=256, sliding_window=8, query_pre_attn_scalar=12,
                                  layer_types=["sliding_attention"] * 5 + ["full_attention"], tie_word_embeddings=True,
                                  **flags)
    return randomise_norms_and_biases(AutoModelForCausalLM.from_config(config).eval())


FAMILY_ARCHS = [("qwen2", "qwen2"), ("qwen3", "qwen3"), ("gemma3_text", "gemma3")]


@pytest.mark.parametrize("family, arch", FAMILY_ARCHS)
def test_uniform_families_export_to_their_own_architecture(family, arch, tmp_path, one_thread):
    """Qwen2 / Qwen3 / Gemma-3 as their own llama.cpp architectures: q/k rows as HF stores them (NeoX-style
    rotary), Qwen2's q/k/v biases kept, Gemma's RMSNorm weights written as 1 + w (llama.cpp multiplies by w),
    Gemma-3's sliding window and global RoPE base."""
    from daprune.export import export_gguf

    model = _tiny_family(family)
    folder = save(model, tmp_path / family)
    res = export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    assert res.arch == arch
    r = gguf.GGUFReader(tmp_path / "m.gguf")
    f = fields(r)
    assert f["general.architecture"] == arch and f[f"{arch}.attention.key_length"] == 12
    sd = {k: v.float().numpy() for k, v in model.state_dict().items()}
    np.testing.assert_array_equal(tensor(r, "blk.1.attn_q.weight"), sd["model.layers.1.self_attn.q_proj.weight"])
    if family == "qwen2":
        np.testing.assert_array_equal(tensor(r, "blk.1.attn_q.bias"), sd["model.layers.1.self_attn.q_proj.bias"])
    if family == "gemma3_text":
        for gguf_name, hf_name in (("blk.0.attn_norm", "input_layernorm"), ("blk.0.attn_q_norm", "self_attn.q_norm"),
                                   ("blk.0.post_ffw_norm", "post_feedforward_layernorm")):
            np.testing.assert_array_equal(tensor(r, f"{gguf_name}.weight"), sd[f"model.layers.0.{hf_name}.weight"] + 1)
        assert f["gemma3.attention.sliding_window"] == 8
        assert f["gemma3.rope.freq_base"] == model.config.rope_parameters["full_attention"]["rope_theta"]


def test_gemma3_layouts_llamacpp_computes_differently_are_refused(tmp_path, one_thread):
    """llama.cpp's gemma3 graph hard-codes a global layer every 6th and no soft-capping: others are refused."""
    from test_families import tiny

    from daprune.export import export_gguf
    from daprune.export.arch import ExportError

    folder = save(tiny("gemma3_text", layers=4), tmp_path / "g")  # global every 2nd layer, final soft-capping
    with pytest.raises(ExportError, match="every 6th layer"):
        export_gguf(folder, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("family, arch", FAMILY_ARCHS)
def test_llamacpp_runs_each_family_like_transformers(family, arch, tmp_path, one_thread):
    """The exported GGUF in llama.cpp itself: next-token log-probabilities of a 30-token text equal
    transformers' within 1e-3 nats (f32), and the same top-1 token everywhere. Skipped without llama_cpp
    (``pip install daprune[llamacpp]`` compiles it)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from daprune.export import export_gguf

    model = _tiny_family(family)
    folder = save(model, tmp_path / family)
    export_gguf(folder, tmp_path / "m.gguf", outtype="f32")
    _assert_llamacpp_matches(llama_cpp, model, tmp_path / "m.gguf")


def _llamacpp_gap(llama_cpp, model, path: Path, n: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Per position of an ``n``-token random text, the largest difference between llama.cpp's and transformers'
    next-token log-probabilities, and whether both rank the same token first."""
    ids = torch.randint(3, 128, (1, n), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = torch.log_softmax(model(ids).logits[0].float(), -1).numpy()
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=64, logits_all=True, n_threads=1, verbose=False)
    try:
        llm.eval(ids[0].tolist())
        got = _log_softmax(np.array(llm.scores[:n], dtype=np.float32))
    finally:
        llm.close()
    return np.abs(got - ref).max(-1), got.argmax(-1) == ref.argmax(-1)


def _assert_llamacpp_matches(llama_cpp, model, path: Path) -> None:
    """llama.cpp's next-token log-probabilities of a 30-token text within 1e-3 nats of transformers', the same
    top-1 token everywhere."""
    gap, same = _llamacpp_gap(llama_cpp, model, path)
    assert float(gap.max()) < 1e-3 and same.all()


@pytest.mark.parametrize("family, flags, window", [
    ("mistral", {"sliding_window": 8}, 8), ("mistral", {"sliding_window": None}, None),
    ("qwen2", {"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 0}, 8),
    ("qwen2", {}, None), ("llama", {}, None)])
def test_sliding_window_llamacpp_ignores_bounds_the_context(family, flags, window, tmp_path, one_thread):
    """llama.cpp's llama / qwen2 graphs attend to the whole context: a model whose transformers attention slides
    is written with its window as context_length (where both compute the same), and the summary says so."""
    from test_families import tiny

    from daprune.export import export_gguf

    model = tiny(family, layers=2, **flags)
    res = export_gguf(save(model, tmp_path / "w"), tmp_path / "m.gguf", outtype="f32")
    f = fields(gguf.GGUFReader(tmp_path / "m.gguf"))
    assert f[f"{res.arch}.context_length"] == (window or 256)
    assert [("window 8" in n) for n in res.notes] == ([True] if window else [])


@pytest.mark.parametrize("config, window", [
    ({"model_type": "mistral"}, 4096),  # the key missing: MistralConfig's default
    ({"model_type": "mistral", "sliding_window": None}, None),
    ({"model_type": "mistral", "sliding_window": 8, "layer_types": ["full_attention"] * 2}, 8),  # Mistral ignores them
    ({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": False,
      "layer_types": ["sliding_attention"] * 2}, None),  # transformers drops the window without the flag
    ({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True, "num_hidden_layers": 4,
      "max_window_layers": 4}, None),  # no layer from max_window_layers on
    ({"model_type": "qwen2", "sliding_window": 8, "use_sliding_window": True, "num_hidden_layers": 4,
      "max_window_layers": 2}, 8),
    ({"model_type": "daprune_qwen3", "sliding_window": 8, "use_sliding_window": True,
      "layer_types": ["full_attention", "sliding_attention"]}, 8),  # a pruned folder's remote-code type
    ({"model_type": "llama", "sliding_window": 8}, None),
])
def test_attention_window_follows_transformers_rules(config, window):
    """Which window transformers applies, by each family's own rule (read from transformers 5's Mistral and Qwen2
    code), so the GGUF's context is cut exactly where the two would differ."""
    from daprune.export.arch import attention_window

    assert attention_window(config, "llama") == window


def test_llamacpp_computes_a_sliding_window_model_alike_only_within_the_window(tmp_path, one_thread):
    """Why the context is bounded: a Mistral with an 8-token window in llama.cpp equals transformers on the first
    8 positions and departs after them."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from test_families import tiny

    from daprune.export import export_gguf

    model = tiny("mistral", layers=2, sliding_window=8)
    export_gguf(save(model, tmp_path / "w"), tmp_path / "m.gguf", outtype="f32")
    gap, same = _llamacpp_gap(llama_cpp, model, tmp_path / "m.gguf", n=30)
    assert float(gap[:8].max()) < 1e-3 and same[:8].all() and float(gap[8:].max()) > 1e-2


def test_llamacpp_runs_a_compensated_mistral(tmp_path, one_thread):
    """A Mistral pruned with --compensate-mean keeps its o_proj / down_proj biases outside its config
    (daprune_extra_biases; daprune.load rebuilds them): llama.cpp's llama graph reads them and computes what the
    pruned model computes."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import daprune
    from daprune.export import export_gguf

    out = _prune_compensated("mistral", tmp_path)
    export_gguf(out, tmp_path / "m.gguf", outtype="f32")
    _assert_llamacpp_matches(llama_cpp, daprune.load(out)[0].eval(), tmp_path / "m.gguf")


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2", "qwen3", "gemma3_text"])
def test_prune_gguf_precheck_agrees_with_the_writer(family, tmp_path, one_thread):
    """For every family the GGUF export takes: ``prune --gguf --compensate-mean`` is refused before pruning
    exactly where the writer refuses the compensated prune afterwards (llama.cpp reads the biases in the llama
    graph, which Llama, Mistral and Qwen2 are written as; in no graph of Qwen3 or Gemma-3)."""
    from daprune.export import export_gguf
    from daprune.export.arch import ExportError, check_prune_export

    out = _prune_compensated(family, tmp_path)
    source = json.loads((tmp_path / f"s-{family}" / "config.json").read_text())
    try:
        check_prune_export(source, "uniform", 0.3, False, ["attention", "mlp"])
        predicted = False
    except ExportError:
        predicted = True
    try:
        export_gguf(out, tmp_path / "m.gguf", outtype="f32")
        refused = False
    except ExportError as exc:
        assert "bias" in str(exc), exc  # the refusal predicted, not another one
        refused = True
    assert predicted == refused == (family in ("qwen3", "gemma3_text"))


def test_tokenizer_larger_than_the_embedding_refused(tmp_path, one_thread):
    """A tokenizer with more tokens than the embedding has rows (here a pad token added after the fact) gives a GGUF
    llama.cpp does not load: refused before anything is written."""
    from daprune.export import export_gguf
    from daprune.export.arch import ExportError

    folder = save(tiny_model(layers=2, heads=4, kv=2, hidden=32, inter=64), tmp_path / "f")
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["added_tokens"].append({"id": 128, "content": "<pad>", "single_word": False, "lstrip": False,
                               "rstrip": False, "normalized": False, "special": True})
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    with pytest.raises(ExportError, match="has 129 tokens and the embedding 128 rows"):
        export_gguf(folder, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors")
def test_empty_blocks_llamacpp_would_compute_otherwise_are_refused(tmp_path, one_thread):
    """A hand-sliced folder: a block with no heads left keeps its o_proj bias in transformers, which llama.cpp's
    deci graph skips with the attention (refused when nonzero, left out when zero); a block with heads but no FFN
    channels is skipped whole by deci (refused)."""
    from daprune.export import export_gguf
    from daprune.export.arch import ExportError

    model = tiny_model(layers=3, heads=4, kv=2, hidden=32, inter=64, bias=True)
    attn = model.model.layers[1].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        setattr(attn, name, torch.nn.Linear(32, 0, bias=True))
    attn.o_proj = torch.nn.Linear(0, 32, bias=True)
    with torch.no_grad():
        attn.o_proj.bias.copy_(torch.linspace(-1, 1, 32))
    layers = [{"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64},
              {"num_attention_heads": 0, "num_key_value_heads": 0, "intermediate_size": 64},
              {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}]
    folder = save(model, tmp_path / "a", {"daprune_layers": layers})
    with pytest.raises(ExportError, match="o_proj.bias is a nonzero bias, and its linear has no weights left"):
        export_gguf(folder, tmp_path / "m.gguf")
    with torch.no_grad():
        attn.o_proj.bias.zero_()
    res = export_gguf(save(model, tmp_path / "b", {"daprune_layers": layers}), tmp_path / "m.gguf")
    assert res.arch == "deci" and res.per_layer["head_count"] == [4, 0, 4]
    assert [n for n in res.dropped_zero_biases if ".1." in n] == [
        f"model.layers.1.self_attn.{x}_proj.bias" for x in "koqv"]
    mlp = tiny_model(layers=3, heads=4, kv=2, hidden=32, inter=64)
    block = mlp.model.layers[2].mlp
    block.gate_proj, block.up_proj = torch.nn.Linear(32, 0, bias=False), torch.nn.Linear(32, 0, bias=False)
    block.down_proj = torch.nn.Linear(0, 32, bias=False)
    layers[1], layers[2] = dict(layers[0]), {"num_attention_heads": 4, "num_key_value_heads": 2,
                                             "intermediate_size": 0}
    with pytest.raises(ExportError, match="block 2 keeps attention heads but no FFN channels"):
        export_gguf(save(mlp, tmp_path / "c", {"daprune_layers": layers}), tmp_path / "n.gguf")
    assert not (tmp_path / "n.gguf").exists()


# every bias each family's config can state; llama.cpp reads the o_proj / MLP ones only in llama (and deci)
BIAS_FAMILIES = [("qwen3", "qwen3", {"attention_bias": True}), ("gemma3_text", "gemma3", {"attention_bias": True}),
                 ("llama", "llama", {"attention_bias": True, "mlp_bias": True})]


def _gguf_bias_names(path: Path) -> set[str]:
    return {t.name for t in gguf.GGUFReader(path).tensors if t.name.endswith(".bias")}


@pytest.mark.parametrize("family, arch, flags", BIAS_FAMILIES)
def test_biases_only_where_llamacpp_reads_them(family, arch, flags, tmp_path, one_thread):
    """q/k/v biases go into every GGUF (values as transformers holds them); o_proj and MLP biases only where the
    graph reads them (llama). Elsewhere a nonzero one is refused before anything is written (llama.cpp does not
    load such a file: the next test) and an all-zero one is left out and counted."""
    from daprune.export import export_gguf
    from daprune.export.arch import ExportError

    model = _tiny_family(family, **flags)
    out = tmp_path / "m.gguf"
    if arch == "llama":
        res = export_gguf(save(model, tmp_path / "b"), out, outtype="f32")
        names = _gguf_bias_names(out)
        assert {f"blk.0.{t}.bias" for t in ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up",
                                            "ffn_down")} <= names
        assert len(names) == 7 * 4 and res.dropped_zero_biases == []
        return
    with pytest.raises(ExportError, match=rf"o_proj.bias is a nonzero bias, and llama.cpp's {arch} graph reads no "
                                          "attn_output bias"):
        export_gguf(save(model, tmp_path / "b"), out, outtype="f32")
    assert not out.exists() and not list(tmp_path.glob(".m.gguf*"))
    layers = model.model.layers
    with torch.no_grad():
        for layer in layers:
            layer.self_attn.o_proj.bias.zero_()
    res = export_gguf(save(model, tmp_path / "z"), out, outtype="f32")
    assert _gguf_bias_names(out) == {f"blk.{i}.attn_{x}.bias" for i in range(len(layers)) for x in "qkv"}
    assert res.dropped_zero_biases == [f"model.layers.{i}.self_attn.o_proj.bias" for i in range(len(layers))]
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(out).tensors}
    np.testing.assert_array_equal(got["blk.1.attn_k.bias"], layers[1].self_attn.k_proj.bias.detach().numpy())


def _assert_llamacpp_refuses(llama_cpp, path: Path, capfd) -> None:
    """llama.cpp does not load ``path``, for the reason the writer's refusal gives: a tensor its graph never
    creates (its loader counts them; the reason is in its log)."""
    capfd.readouterr()
    with pytest.raises(ValueError, match="Failed to load model"):
        llama_cpp.Llama(model_path=str(path), n_ctx=64, n_threads=1, verbose=True)
    assert "wrong number of tensors" in capfd.readouterr().err


@pytest.mark.parametrize("layout", ["uniform", "per-layer"])
def test_llamacpp_runs_pruned_and_compensated_qwen2(layout, tmp_path, one_thread):
    """A Qwen2 with heads pruned and --compensate-mean biases, which llama.cpp's qwen2 graph cannot hold (q_proj and
    o_proj hidden x hidden, no o_proj / MLP bias), runs in llama.cpp as llama (uniform) or deci (per-layer) with q/k
    rows and biases in Meta's rotary layout, and computes what the pruned model computes."""
    llama_cpp = pytest.importorskip("llama_cpp")
    import daprune
    from daprune.export import export_gguf

    shape = ("--layout", "uniform") if layout == "uniform" else ("--schedule", "owl")
    out = _prune_compensated("qwen2", tmp_path, ("--head-split", "paper", *shape))
    res = export_gguf(out, tmp_path / "m.gguf", outtype="f32")
    heads = res.per_layer["head_count"]
    assert res.arch == ("llama" if layout == "uniform" else "deci") and min(heads) < 4
    assert layout == "uniform" or len(set(zip(heads, res.per_layer["feed_forward_length"], strict=True))) > 1
    _assert_llamacpp_matches(llama_cpp, daprune.load(out)[0].eval(), tmp_path / "m.gguf")


@pytest.mark.parametrize("family, arch, flags", BIAS_FAMILIES)
def test_llamacpp_reads_the_biases_written(family, arch, flags, tmp_path, one_thread, monkeypatch, capfd):
    """In llama.cpp itself: each family with every bias its config states (o_proj's zeroed where the graph reads
    none) computes what transformers computes, so the q/k/v (and Llama's o_proj / MLP) biases are read; and a
    qwen3 / gemma3 GGUF that holds an o_proj bias (the writer's refusal bypassed) does not load at all."""
    llama_cpp = pytest.importorskip("llama_cpp")
    from daprune.export import export_gguf, gguf_writer

    model = _tiny_family(family, **flags)
    if arch != "llama":
        monkeypatch.setattr(gguf_writer, "reads_bias", lambda arch, tensor: True)
        export_gguf(save(model, tmp_path / "b"), tmp_path / "bad.gguf", outtype="f32")
        assert "blk.0.attn_output.bias" in _gguf_bias_names(tmp_path / "bad.gguf")
        _assert_llamacpp_refuses(llama_cpp, tmp_path / "bad.gguf", capfd)
        monkeypatch.undo()
        with torch.no_grad():
            for layer in model.model.layers:
                layer.self_attn.o_proj.bias.zero_()
    export_gguf(save(model, tmp_path / "z"), tmp_path / "m.gguf", outtype="f32")
    _assert_llamacpp_matches(llama_cpp, model, tmp_path / "m.gguf")


def test_cli_export(per_layer_folder, tmp_path, capsys):
    from daprune.cli import main

    folder, _ = per_layer_folder
    assert main(["export", str(folder), "--gguf", str(tmp_path / "c.gguf")]) == 0
    out = capsys.readouterr().out
    assert "architecture deci" in out and "[4, 2, 4]" in out
    assert main(["export", str(tmp_path / "missing"), "--gguf", str(tmp_path / "y.gguf")]) == 2


def test_prune_writes_a_gguf_too(tmp_path, one_thread):
    from daprune.cli import main

    src = save(tiny_model(layers=4, heads=4, kv=2, hidden=32, inter=64), tmp_path / "src")
    out, gg = tmp_path / "out", tmp_path / "p.gguf"
    code = main(["prune", "--model", str(src), "--out", str(out), "--sparsity", "0.2", "--layers", "1:-1",
                 "--calibration", "random", "--nsamples", "4", "--seqlen", "16", "--gguf", str(gg), "--quiet"])
    assert code == 0
    f = fields(gguf.GGUFReader(gg))
    arch = f["general.architecture"]
    cfg = json.loads((out / "config.json").read_text())
    assert arch == ("deci" if cfg.get("daprune_layers") else "llama")
    total_ff = f[f"{arch}.feed_forward_length"]
    assert (sum(total_ff) if isinstance(total_ff, list) else 4 * total_ff) < 4 * 64  # the pruned widths


def _prune_compensated(arch: str, tmp_path: Path, shape: tuple[str, ...] = ("--layout", "uniform")) -> Path:
    """A tiny ``arch`` pruned with --compensate-mean in every block (``shape``: the layout / split settings, uniform
    by default): o_proj and down_proj biases."""
    from daprune.cli import main

    # a pad token of its own: else transformers' Qwen2Tokenizer adds one (129 tokens for 128 embedding rows)
    src = save(_tiny_family(arch, **({"sliding_window": None} if arch == "mistral" else {})), tmp_path / f"s-{arch}",
               pad=True)
    out = tmp_path / f"out-{arch}"
    assert main(["prune", "--model", str(src), "--out", str(out), "--sparsity", "0.3", "--layers", "0:",
                 "--compensate-mean", "--calibration", "random", "--nsamples", "4", "--seqlen", "16", "--quiet",
                 *shape]) == 0
    return out


@pytest.mark.parametrize("arch, extra, exported", [("qwen3", True, False), ("qwen2", True, True),
                                                   ("mistral", True, True), ("llama", False, True)])
def test_compensation_biases_exported_where_llamacpp_reads_them(arch, extra, exported, tmp_path, one_thread):
    """--compensate-mean's o_proj / down_proj biases: Qwen3 (down_proj's outside its config; its llama.cpp graph
    reads neither) is refused by the writer, as ``prune --gguf`` predicts before pruning (tests/test_cli_early.py);
    Qwen2 and Mistral (outside their configs, daprune_extra_biases) and Llama (config flags) export with both
    biases written, as transformers holds them: Qwen2 as llama, whose graph reads them."""
    from daprune.errors import DapruneError
    from daprune.export import export_gguf

    out, gg = _prune_compensated(arch, tmp_path), tmp_path / f"{arch}.gguf"
    assert bool(json.loads((out / "config.json").read_text()).get("daprune_extra_biases")) == extra
    if not exported:
        with pytest.raises(DapruneError, match="bias is a nonzero bias, and llama.cpp's qwen3 graph"):
            export_gguf(out, gg)
        assert not gg.exists()
        return
    assert export_gguf(out, gg, outtype="f32").arch == "llama"
    from safetensors.torch import load_file

    sd = load_file(out / "model.safetensors")
    got = {t.name: np.asarray(t.data) for t in gguf.GGUFReader(gg).tensors}
    level2 = {"self_attn.o_proj": "attn_output", "mlp.down_proj": "ffn_down"}
    written = [(f"blk.{i}.{g}.bias", f"model.layers.{i}.{h}.bias") for i in range(4) for h, g in level2.items()
               if f"model.layers.{i}.{h}.bias" in sd]
    assert {g for g, _ in written} == {n for n in got if n.endswith(("attn_output.bias", "ffn_down.bias"))}
    assert sum(g.endswith("ffn_down.bias") for g, _ in written) == 4  # channels went in every block
    for g, h in written:
        np.testing.assert_array_equal(got[g], sd[h].numpy())
    assert any(np.abs(got[g]).sum() > 0 for g, _ in written)


# -- a real llama.cpp (slow: llama-cpp-python compiles from source) -------------------------------------

TEXT = ("The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 for the "
        "World's Fair. Today millions of visitors climb it every year to look over the city and the river Seine.")


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["uniform", "per-layer"])
def test_llamacpp_runs_the_export_like_transformers(kind, smollm, data_dir, tmp_path):
    """SmolLM2 as llama (dense) and as deci (blocks sliced to different widths) in llama.cpp: f16 export.

    Tolerances (f16 weights vs the fp32 transformers model): next-token log-probability within 0.05 nats
    at every position of the text, the same top-1 token everywhere, perplexity on 16 WikiText-2 windows
    within 1%. Measured: docs/gguf.md.
    """
    import copy

    llama_cpp = pytest.importorskip("llama_cpp")
    from daprune.data.text import load_text
    from daprune.evaluation.perplexity import perplexity_of_ids, windows
    from daprune.export import export_gguf
    from daprune.models.loading import default_gguf_path

    model, tok, _ = smollm
    if kind == "per-layer":
        model = copy.deepcopy(model)
        shrink(model, {5: [0, 1, 3, 4, 6, 7], 11: [0, 3, 6]}, {5: list(range(0, 1536, 2)), 12: list(range(1000))})
    folder = tmp_path / kind
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    res = export_gguf(folder, tmp_path / "m.gguf", outtype="f16", tokenizer_gguf=default_gguf_path())
    assert res.arch == ("llama" if kind == "uniform" else "deci")
    llm = llama_cpp.Llama(model_path=str(tmp_path / "m.gguf"), n_ctx=256, logits_all=True, n_threads=2,
                          verbose=False)
    ids = tok(TEXT)["input_ids"]
    llm.eval(ids)
    got = _log_softmax(np.asarray(llm.scores[: len(ids)]))
    with torch.no_grad():
        ref = torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].double(), -1).numpy()
    rows, nxt = np.arange(len(ids) - 1), np.asarray(ids[1:])
    assert np.abs(got[rows, nxt] - ref[rows, nxt]).max() < 0.05
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    stream = torch.tensor(tok(load_text("wikitext2", data_dir))["input_ids"])
    wins = windows(stream, 128, 16)
    nll = 0.0
    for w in wins.tolist():
        llm.reset()
        llm.eval(w)
        lp = _log_softmax(np.asarray(llm.scores[:128]))
        nll -= lp[np.arange(127), w[1:]].sum()
    ppl_cpp = float(np.exp(nll / (16 * 127)))
    ppl_hf = perplexity_of_ids(model, stream, max_windows=16, progress=False)["ppl"]
    assert ppl_cpp == pytest.approx(ppl_hf, rel=0.01)
    llm.reset()
    text = llm.create_completion("The capital of France is", max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert text.strip()
    if kind == "uniform":
        assert "Paris" in text
