"""Shared fixtures: tiny random models for fast invariants, the real SmolLM2 for slow tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def tiny_model(arch: str = "llama", *, layers: int = 6, heads: int = 6, kv: int = 2, hidden: int = 48,
               inter: int = 96, vocab: int = 128, seed: int = 0, bias: bool = False, tie: bool = False):
    """A randomly initialised decoder of the given family, small enough for second-long tests.

    ``tie`` shares the LM head with the embedding, the case where streaming must read the real embedding."""
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    kwargs = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=256,
                  tie_word_embeddings=tie, head_dim=hidden // heads)
    if arch == "llama" and bias:
        kwargs["attention_bias"] = True
    config = AutoConfig.for_model(arch, **kwargs)
    model = AutoModelForCausalLM.from_config(config).eval()
    # random init has near-zero norms weights; make RMSNorm weights non-trivial so slicing bugs show
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    return model


class CharTokenizer:
    """Minimal tokenizer for tiny models: bytes modulo the vocabulary."""

    def __init__(self, vocab: int = 128):
        self.vocab = vocab
        self.bos_token_id = None
        self.eos_token_id = 0
        self.pad_token_id = 0

    def __call__(self, text: str, **_):
        return {"input_ids": [b % self.vocab for b in text.encode()]}

    def save_pretrained(self, _path):
        pass



def output_linear_gradients(model, adapter, ids: torch.Tensor) -> dict[tuple[int, str], torch.Tensor]:
    """dL/dy at every block's attention ("o") and FFN ("down") output linear, L the summed next-token NLL over
    ``ids``, by differentiating a zero added to each output: the reference the fisher and token-gradient passes are
    checked against (shaped as the linear's output: OPT's FFN gives [batch * seq, hidden])."""
    import torch.nn.functional as F

    zeros: dict[tuple[int, str], torch.Tensor] = {}
    hooks = []
    for i in range(adapter.n_layers):
        b = adapter.block(i)
        for role, mod in (("o", b.attn_out()), ("down", b.ffn_out())):
            def add_zero(_m, _inp, out, key=(i, role)):
                zeros[key] = torch.zeros_like(out, requires_grad=True)
                return out + zeros[key]
            hooks.append(mod.register_forward_hook(add_zero))
    try:
        with torch.enable_grad():
            logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1),
                                   reduction="sum")
            keys = list(zeros)
            grads = torch.autograd.grad(loss, [zeros[k] for k in keys])
    finally:
        for h in hooks:
            h.remove()
    return dict(zip(keys, grads, strict=True))

@pytest.fixture
def one_thread():
    """Tiny matmuls on a shared 2-core machine: a second OpenMP thread only adds contention (up to 30x slower)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def tiny():
    return tiny_model()


@pytest.fixture(scope="session")
def data_dir() -> str:
    value = os.environ.get("DAPRUNE_DATA_DIR") or (str(SHARED_DATA) if SHARED_DATA.is_dir() else None)
    if value is None:
        pytest.skip("no evaluation data folder (set DAPRUNE_DATA_DIR)")
    return value


@pytest.fixture(scope="session")
def smollm(tmp_path_factory):
    """The real embedded default model (converted once per test session into a temp cache)."""
    pytest.importorskip("gguf")
    from daprune.models.loading import load_model

    cache = os.environ.get("DAPRUNE_CACHE") or str(tmp_path_factory.mktemp("cache"))
    model, tok, _ = load_model(None, cache=cache)
    return model, tok, cache


def benchmark_module(name: str):
    """A script of benchmarks/ imported as a module (the folder is not a package: scripts run by path)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
