"""Streaming mode: one block at a time from safetensors, bit-identical to the in-memory path."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_model

import daprune
from daprune.api import prune
from daprune.errors import ConfigError, DeviceError

FAST = dict(calibration="random", nsamples=8, seqlen=24, sparsity=0.2, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def _tied_model():
    return tiny_model(layers=4, seed=1, tie=True)


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    from daprune.loader import load_pruned

    return load_pruned(folder)[0].state_dict()


def _layers(report: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "seconds"} for r in report["layers"]]


def word_tokenizer(vocab: int = 128, *, bos: bool = True, eos: bool = True, pad: bool = False):
    """A real (saveable) fast tokenizer built offline: words ``w3``..``w{vocab-1}``, specials as asked."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab)}}
    tok = Tokenizer(models.WordLevel(words, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    special = {"unk_token": "<unk>"}
    if bos:
        special["bos_token"] = "<s>"
    if eos:
        special["eos_token"] = "</s>"
    if pad:
        special["pad_token"] = "<unk>"
    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def save_model(model, folder: Path, shard: str | None = None, tokenizer: bool = True) -> Path:
    model.save_pretrained(folder, **({"max_shard_size": shard} if shard else {}))
    if tokenizer:
        word_tokenizer(model.config.vocab_size).save_pretrained(folder)
    return folder


def _pair(tmp_path: Path, model, shard: str | None = None, **kw):
    """Prune the same on-disk model twice: streaming, and in memory (``--no-streaming``)."""
    src = save_model(model, tmp_path / "src", shard)
    settings = {**FAST, **kw}
    a = prune(model=str(src), out=str(tmp_path / "stream"), **settings)
    b = prune(model=str(src), out=str(tmp_path / "mem"), streaming=False, **settings)
    return a, b


VARIANTS = {
    "non-uniform": (lambda: tiny_model(), dict(layers="1:-1")),
    "recovery": (lambda: tiny_model(), dict(layers="0:", recovery="both", head_split="paper")),
    "flap-adaptive-bias": (lambda: tiny_model(), dict(layers="1:-1", ffn_criterion="flap", head_criterion="flap",
                                                     schedule="adaptive")),
    "tied": (_tied_model, dict(layers="0:")),
    "bfloat16": (lambda: tiny_model(layers=4), dict(layers="0:", dtype="bfloat16")),
    "qwen2": (lambda: tiny_model("qwen2", layers=4), dict(layers="0:", head_split="paper")),
    "disk-activations": (lambda: tiny_model(layers=4), dict(layers="1:", activations="disk")),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_streaming_is_bit_identical_to_in_memory(tmp_path, name):
    make, kw = VARIANTS[name]
    a, b = _pair(tmp_path, make(), **kw)
    assert a.report["execution"]["streaming"] and not b.report["execution"]["streaming"]
    wa, wb = _weights(tmp_path / "stream"), _weights(tmp_path / "mem")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    for f in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"):
        assert (tmp_path / "stream" / f).read_text() == (tmp_path / "mem" / f).read_text()
    assert _layers(a.report) == _layers(b.report)
    assert a.report["params"] == b.report["params"]
    assert not (tmp_path / "stream.daprune-work").exists()


def test_uniform_output_loads_with_vanilla_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    a, b = _pair(tmp_path, _tied_model(), layers="0:", head_split="ffn-only")
    assert [f.name for f in (tmp_path / "stream").glob("*.safetensors")] == ["model.safetensors"]  # small: 1 shard
    from safetensors import safe_open

    with safe_open(str(tmp_path / "stream" / "model.safetensors"), framework="pt") as fh:
        names = list(fh.keys())  # safe_open handles are not containers
    assert "lm_head.weight" not in names  # tied: written once, like save_pretrained
    assert not (tmp_path / "stream" / "modeling_daprune.py").exists()
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "stream")
    ref = b.model
    assert plain.lm_head.weight is plain.model.embed_tokens.weight or torch.equal(plain.lm_head.weight,
                                                                                 plain.model.embed_tokens.weight)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    assert torch.equal(plain(ids).logits, ref(ids).logits)
    assert a.model is not None and a.model.config.intermediate_size == plain.config.intermediate_size


@pytest.mark.parametrize("save_dtype", ["source", "float32"])
def test_output_keeps_the_source_dtype_and_is_sharded_by_size(tmp_path, save_dtype):
    """A bf16 checkpoint pruned in fp32 is written in bf16 (or what --save-dtype says), in shards of at most
    --max-shard-size (a block is never split), streaming and in memory alike; report.json counts the files."""
    from safetensors import safe_open

    model = tiny_model(layers=6).to(torch.bfloat16)
    a, b = _pair(tmp_path, model, layers="1:-1", max_shard_size="40KB", save_dtype=save_dtype)
    want = "bfloat16" if save_dtype == "source" else "float32"
    itemsize = 2 if want == "bfloat16" else 4
    biggest = max(sum(p.numel() for p in layer.parameters()) for layer in b.model.model.layers) * itemsize
    bound = max(40_000, biggest) + 8_000  # + the safetensors header
    for out, res in (("stream", a), ("mem", b)):
        files = sorted((tmp_path / out).glob("*.safetensors"))
        assert len(files) > 2 and (tmp_path / out / "model.safetensors.index.json").is_file()
        assert res.report["output"]["shards"] == len(files) and res.report["output"]["dtype"] == want
        assert json.loads((tmp_path / out / "config.json").read_text())["dtype"] == want
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                names = fh.keys()  # safe_open handles are not iterable
                assert {str(fh.get_tensor(k).dtype) for k in names} == {f"torch.{want}"}
        if out == "stream":  # our writer: shards of at most the limit, or one block where a block is bigger
            assert all(f.stat().st_size <= bound for f in files)
    wa, wb = _weights(tmp_path / "stream"), _weights(tmp_path / "mem")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    reloaded, _ = daprune.load(tmp_path / "stream", dtype=want)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, daprune.load(tmp_path / "mem", dtype=want)[0](ids).logits)


def test_sharded_source_with_index(tmp_path):
    a, _ = _pair(tmp_path, tiny_model(layers=4), shard="60KB", layers="0:")
    assert (tmp_path / "src" / "model.safetensors.index.json").is_file()
    assert _weights(tmp_path / "stream").keys() == _weights(tmp_path / "mem").keys()
    assert a.report["execution"]["streaming"]


def test_only_one_block_is_materialised_at_a_time(tmp_path, monkeypatch):
    """Memory independent of depth: at most one block holds real tensors at any moment."""
    from daprune.stores import StreamingStore

    save_model(tiny_model(layers=6), tmp_path / "src", tokenizer=False)
    seen: list[int] = []
    orig = StreamingStore.load

    def load(self, i):
        block = orig(self, i)
        live = [j for j, layer in enumerate(self.adapter.layers())
                if any(p.device.type != "meta" for p in layer.parameters())]
        seen.append(len(live))
        emb = self.adapter.model.get_input_embeddings().weight
        assert emb.device.type == "meta"  # the embedding matrix is only real while embedding the ids
        return block

    monkeypatch.setattr(StreamingStore, "load", load)
    prune(model=str(tmp_path / "src"), out=str(tmp_path / "out"), layers="0:", **FAST)
    assert seen and max(seen) == 1


def test_streaming_refused_where_impossible(tmp_path):
    with pytest.raises(ConfigError, match="--streaming is not possible here: a loaded model object was passed"):
        prune(model=tiny_model(layers=2), tokenizer=None, out=str(tmp_path / "o"), streaming=True, **FAST)
    with pytest.raises(ConfigError, match="no output folder"):
        prune(model=tiny_model(layers=2), tokenizer=None, streaming=True, **FAST)


def test_device_resolution():
    from daprune.devices import resolve_device

    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto") == (torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    with pytest.raises(DeviceError, match="unknown --device"):
        resolve_device("tpu9")
    if not torch.cuda.is_available():
        with pytest.raises(DeviceError, match="no CUDA device is visible"):
            resolve_device("cuda")


def test_multi_gpu_placement_splits_an_oversized_block(monkeypatch):
    """The multi-GPU path, with simulated free memory (CI has no GPU): a block that fits nowhere is spread by
    accelerate's infer_auto_device_map, attention and MLP whole, the CPU as last resort."""
    from accelerate import init_empty_weights
    from accelerate.utils import compute_module_sizes

    import daprune.devices as devices

    with init_empty_weights():
        layer = tiny_model(layers=1).model.layers[0]
    size = compute_module_sizes(layer, dtype=torch.float32)[""]
    children = {name for name, _ in layer.named_children()}
    monkeypatch.setattr(devices, "resolve_device", lambda spec: torch.device("cuda", 0))
    one = devices.plan_placement("auto", layer, torch.float32, free_memory={0: size * 10, 1: size})
    assert one.device_map is None and one.device == torch.device("cuda", 0)
    # 0.8 x the block per GPU: accelerate keeps room for the largest part on the first GPU, so three are needed
    split = devices.plan_placement("auto", layer, torch.float32, free_memory={i: int(size * 2.4) for i in range(3)})
    assert split.device_map is not None and set(split.device_map) == children  # attention and MLP never split
    assert len(set(split.device_map.values())) == 2 and "cpu" not in split.device_map.values()
    assert split.device == torch.device("cuda", min(split.device_map.values()))
    # two such GPUs are too few: the part that fits on neither goes to the CPU
    mixed = devices.plan_placement("auto", layer, torch.float32,
                              free_memory={0: int(size * 2.4), 1: int(size * 2.4), "cpu": size * 30})
    assert mixed.device_map is not None and set(mixed.device_map) == children
    assert "cpu" in mixed.device_map.values() and mixed.device.type == "cuda"
    with pytest.raises(DeviceError, match="more than the visible GPUs offer"):
        devices.plan_placement("auto", layer, torch.float32, free_memory={0: size // 4, 1: size // 4})
    cpu = devices.plan_placement("auto", layer, torch.float32,
                                 free_memory={0: size // 4, 1: size // 4, "cpu": size * 30})
    assert cpu.device_map is None and cpu.device == torch.device("cpu")  # fits nowhere but the CPU
    with pytest.raises(DeviceError, match="more than the visible GPUs and the free CPU memory offer"):
        devices.plan_placement("auto", layer, torch.float32, free_memory={0: size // 4, 1: size // 4, "cpu": size})
    fixed = devices.plan_placement("cuda", layer, torch.float32, free_memory={0: 1, 1: 1})
    assert fixed.device_map is None  # an explicit device is never split


@pytest.mark.parametrize("kind", ["per-child", "inferred"])
def test_device_map_execution_is_bit_identical(tmp_path, monkeypatch, kind):
    """The device-map branch (dispatch_model hooks in load, their removal in release), run on the CPU only:
    the placement is forced to a device map whose parts are all on "cpu"; weights equal a plain streaming run."""
    import daprune.devices as devices
    import daprune.stores as stores

    src = save_model(tiny_model(layers=3), tmp_path / "src")
    settings = {**FAST, "layers": "0:"}
    prune(model=str(src), out=str(tmp_path / "plain"), **settings)

    def placement(spec, layer, dtype, **_):
        if kind == "per-child":
            device_map = {name: "cpu" for name, _ in layer.named_children()}
        else:
            device_map = devices.block_device_map(layer, dtype, {"cpu": 10**9})
        return devices.Placement(torch.device("cpu"), device_map)

    hooked: list[bool] = []
    orig_load, orig_release = stores.StreamingStore.load, stores.StreamingStore.release

    def load(self, i):
        block = orig_load(self, i)
        hooked.append(all(hasattr(m, "_hf_hook") for m in self.adapter.layers()[i].children()))
        return block

    def release(self, i):
        orig_release(self, i)
        layer = self.adapter.layers()[i]
        assert not any(hasattr(m, "_hf_hook") for m in layer.modules()) and "to" not in layer.__dict__

    monkeypatch.setattr(devices, "plan_placement", placement)
    monkeypatch.setattr(stores.StreamingStore, "load", load)
    monkeypatch.setattr(stores.StreamingStore, "release", release)
    res = prune(model=str(src), out=str(tmp_path / "mapped"), **settings)
    assert res.report["execution"]["streaming"]
    assert hooked and all(hooked)
    wa, wb = _weights(tmp_path / "mapped"), _weights(tmp_path / "plain")
    assert wa.keys() == wb.keys()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_cpu_activations_with_moving_hooks(tmp_path, monkeypatch):
    """--activations cpu: the streams stay on the CPU while blocks run on the compute device.

    Without a GPU the two devices coincide, so force the hooks on to check they keep results identical.
    """
    from daprune.activations import Activations

    monkeypatch.setattr(Activations, "moves", property(lambda self: True))
    a, b = _pair(tmp_path, tiny_model(layers=3), layers="0:", activations="cpu")
    wa, wb = _weights(tmp_path / "stream"), _weights(tmp_path / "mem")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_output_modes_follow_the_umask(tmp_path, umask):
    """Temp files and folders are made owner-only (0600 / 0700); the output renamed into place must carry the
    mode a plain open / mkdir gives under the user's umask, so another account (a serving container) reads it."""
    import os
    import stat

    src = save_model(tiny_model(layers=3), tmp_path / "src")
    old = os.umask(umask)
    try:
        for streaming in (True, False):
            out = tmp_path / f"out-{streaming}"
            prune(model=str(src), out=str(out), streaming=streaming, layers="0:", **FAST)
            entries = [out, *out.rglob("*")]
            assert {"model.safetensors", "report.json", "config.json"} <= {p.name for p in entries}
            for p in entries:
                want = (0o777 if p.is_dir() else 0o666) & ~umask
                assert stat.S_IMODE(p.stat().st_mode) == want, (p.name, oct(p.stat().st_mode), streaming)
    finally:
        os.umask(old)


def test_outputs_are_written_where_modes_cannot_be_set(tmp_path, monkeypatch):
    """On filesystems with fixed modes (FAT, some CIFS/FUSE mounts) chmod fails: the write still succeeds."""
    import os

    from daprune.atomic import atomic_write_json

    def refuse(*_a, **_k):
        raise PermissionError("operation not permitted")

    old = os.umask(0o022)
    try:
        monkeypatch.setattr(os, "chmod", refuse)
        atomic_write_json(tmp_path / "r.json", {"a": 1})
    finally:
        os.umask(old)
    assert json.loads((tmp_path / "r.json").read_text()) == {"a": 1}


def test_exclusive_lock_makes_a_second_holder_wait(tmp_path):
    """The cache's conversion lock: a second taker (another thread's own open of the lock file, as another process
    would have) gets the lock only after the first lets go, then finds the first one's work done."""
    import threading
    import time

    from daprune.atomic import exclusive_lock

    lock, events, held = tmp_path / "c" / ".m.lock", [], threading.Event()

    def first():
        with exclusive_lock(lock):
            held.set()
            time.sleep(0.3)
            events.append("first done")

    t = threading.Thread(target=first)
    t.start()
    held.wait(5)
    with exclusive_lock(lock):
        events.append("second in")
    t.join()
    assert events == ["first done", "second in"]
