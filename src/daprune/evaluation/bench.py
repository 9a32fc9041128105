"""`daprune bench`: size and speed of a pruned model next to its dense original, in one process.

Both models are timed in the same process with alternating repeats (dense, pruned, dense, pruned,
...) and the median is reported, so slow drifts of a shared machine (other jobs, thermal limits) hit
both models alike instead of biasing the ratio.

Counted from shapes, not measured:

* parameters: unique parameters (tied embeddings once);
* weight memory: those parameters' bytes at the benchmark dtype;
* MACs per token at context length ``T`` (default 128)::

      MACs/token = sum over every nn.Linear (q, k, v, o, gate, up, down, lm_head) of in_features * out_features
                 + sum over attention layers of 2 * n_heads * head_dim * T

  The second term is one new token attending to ``T`` positions: ``n_heads * head_dim * T`` for the
  scores ``q . k`` and as many for the weighted sum of values. Embedding lookups, norms, RoPE,
  SiLU and softmax are left out (no matmul; they are elementwise and small).

Timed (random token ids; output quality does not matter for speed):

* prefill tokens/s: one forward of ``batch x 128`` tokens (batch 1 and 8), last-position logits
  only, as ``generate`` does;
* decode tokens/s: batch 1, a 128-token prompt, then 128 greedy steps with a KV cache; only the
  steps are timed.

``speedup`` is the dense model's median time over the pruned model's median time (> 1: pruned is faster).
"""

from __future__ import annotations

import inspect
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from daprune.errors import ConfigError


@dataclass
class BenchSettings:
    """What is measured; the defaults are the documented benchmark."""

    seq_len: int = 128
    batch_sizes: tuple[int, ...] = (1, 8)
    new_tokens: int = 128
    repeats: int = 5
    warmup: int = 1
    context: int | None = None  # attention context for the MACs count; None: seq_len
    seed: int = 0

    @property
    def macs_context(self) -> int:
        return self.context or self.seq_len


# -- counted from shapes ------------------------------------------------------------------------------
def num_params(model: nn.Module) -> int:
    """Unique parameters: a tied lm_head shares the embedding's storage and is counted once."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel()
    return total


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the unique parameters, i.e. what a decode step streams from memory."""
    seen: set[int] = set()
    total = 0
    for p in model.parameters():
        if p.data_ptr() not in seen:
            seen.add(p.data_ptr())
            total += p.numel() * p.element_size()
    return total


def count_macs(model: nn.Module, context: int = 128) -> dict[str, int]:
    """Multiply-accumulates per token (formula in the module docstring), split into linear and attention."""
    linear = sum(m.in_features * m.out_features for m in model.modules() if isinstance(m, nn.Linear))
    attention = sum(2 * m.q_proj.out_features * context for m in _attention_modules(model))
    return {"linear": linear, "attention": attention, "total": linear + attention}


def _attention_modules(model: nn.Module) -> list[nn.Module]:
    """Self-attention modules: a q_proj and a head_dim (q_proj.out_features = n_heads * head_dim)."""
    return [m for m in model.modules() if isinstance(getattr(m, "q_proj", None), nn.Linear) and hasattr(m, "head_dim")]


def static_metrics(model: nn.Module, context: int) -> dict:
    macs = count_macs(model, context)
    return {"params": num_params(model), "weight_bytes": weight_bytes(model), "macs_per_token": macs["total"],
            "macs_linear": macs["linear"], "macs_attention": macs["attention"]}


# -- timed ---------------------------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    """CUDA kernels run asynchronously: wait for them so the clock measures the work, not the launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _cache_kwarg(model: nn.Module) -> str:
    """transformers renamed ``past_key_values`` to ``cache``; pass whichever this model's forward takes."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


@torch.inference_mode()
def time_prefill(model: nn.Module, ids: torch.Tensor) -> float:
    """Seconds for one forward over ``ids`` (last-position logits only, as generation needs)."""
    device = _device(model)
    _sync(device)
    t0 = time.perf_counter()
    model(ids, use_cache=False, logits_to_keep=1)
    _sync(device)
    return time.perf_counter() - t0


@torch.inference_mode()
def greedy_decode(model: nn.Module, prompt: torch.Tensor, new_tokens: int) -> tuple[torch.Tensor, float]:
    """Greedy tokens after ``prompt`` with a KV cache, and the seconds spent on the decode steps alone."""
    from transformers import DynamicCache

    device = _device(model)
    cache = DynamicCache(config=model.config)
    kw = {_cache_kwarg(model): cache, "use_cache": True}
    nxt = model(prompt, logits_to_keep=1, **kw).logits[:, -1:].argmax(-1)
    out = [nxt]
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(new_tokens - 1):
        nxt = model(nxt, **kw).logits[:, -1:].argmax(-1)
        out.append(nxt)
    _sync(device)
    return torch.cat([prompt, *out], dim=1), time.perf_counter() - t0


def _alternate(models: dict[str, nn.Module], fn: Callable[[nn.Module], float], s: BenchSettings) -> dict:
    """Time ``fn`` on every model in turn, repeat after repeat; warm-up rounds are discarded."""
    for _ in range(s.warmup):
        for m in models.values():
            fn(m)
    times: dict[str, list[float]] = {name: [] for name in models}
    for _ in range(s.repeats):
        for name, m in models.items():
            times[name].append(fn(m))
    return times


def _inputs(vocab: int, shape: tuple[int, int], seed: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, shape, generator=g).to(device)


def measure(models: dict[str, nn.Module], s: BenchSettings) -> dict[str, dict[str, list[float]]]:
    """Raw timings per model: ``{name: {"prefill_b1": [s, ...], "prefill_b8": [...], "decode": [...]}}``."""
    first = next(iter(models.values()))
    vocab = first.get_input_embeddings().num_embeddings
    device = _device(first)
    raw: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for b in s.batch_sizes:
        ids = _inputs(vocab, (b, s.seq_len), s.seed, device)
        for name, t in _alternate(models, lambda m, ids=ids: time_prefill(m, ids), s).items():
            raw[name][f"prefill_b{b}"] = t
    prompt = _inputs(vocab, (1, s.seq_len), s.seed + 1, device)
    for name, t in _alternate(models, lambda m: greedy_decode(m, prompt, s.new_tokens)[1], s).items():
        raw[name]["decode"] = t
    return raw


def tokens_per_run(s: BenchSettings) -> dict[str, int]:
    """Tokens processed by one timed run of each measurement (decode times new_tokens - 1 steps)."""
    out = {f"prefill_b{b}": b * s.seq_len for b in s.batch_sizes}
    out["decode"] = s.new_tokens - 1
    return out


def summarise(static: dict[str, dict], raw: dict[str, dict[str, list[float]]], s: BenchSettings) -> dict:
    """The JSON document: per-model metrics with median times and tokens/s, plus dense/pruned speedups."""
    tokens = tokens_per_run(s)
    result: dict = {}
    for name, times in raw.items():
        medians = {k: statistics.median(v) for k, v in times.items()}
        row = dict(static[name])
        row.update({f"{k}_tok_s": tokens[k] / medians[k] for k in medians})
        row["median_s"] = medians
        row["times_s"] = times
        result[name] = row
    result["speedup"] = speedups(result["dense"], result["pruned"], s)
    return result


def speedups(dense: dict, pruned: dict, s: BenchSettings) -> dict[str, float]:
    """Dense median time / pruned median time; ``prefill`` is the first batch size (1 by default)."""
    med_d, med_p = dense["median_s"], pruned["median_s"]
    out = {k: med_d[k] / med_p[k] for k in med_d}
    out["prefill"] = out[f"prefill_b{s.batch_sizes[0]}"]
    out["macs"] = dense["macs_per_token"] / pruned["macs_per_token"]
    out["weight_bytes"] = dense["weight_bytes"] / pruned["weight_bytes"]
    return out


def bench_models(dense: nn.Module, pruned: nn.Module, s: BenchSettings | None = None) -> dict:
    """Measure both models (already loaded, same device and dtype) and return the JSON document."""
    s = s or BenchSettings()
    dense.eval()
    pruned.eval()
    models = {"dense": dense, "pruned": pruned}
    static = {name: static_metrics(m, s.macs_context) for name, m in models.items()}
    result = summarise(static, measure(models, s), s)
    result["settings"] = asdict(s)
    result["environment"] = environment(_device(dense), next(dense.parameters()).dtype)
    return result


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Where the numbers come from: speed is meaningless without the machine."""
    env = {"device": str(device), "dtype": str(dtype).removeprefix("torch."), "torch": torch.__version__,
           "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(), "machine": platform.machine(),
           "processor": platform.processor() or None}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


# -- presentation --------------------------------------------------------------------------------------
def format_bench(result: dict) -> str:
    """Table: one row per metric, columns dense, pruned and pruned/dense (for tokens/s: the speedup)."""
    from daprune.report import format_table

    d, p = result["dense"], result["pruned"]
    settings = result.get("settings", {})
    ctx = settings.get("context") or settings.get("seq_len", 128)
    rows = [
        ["parameters", f"{d['params']:,}", f"{p['params']:,}", f"{p['params'] / d['params']:.3f}"],
        [f"MACs/token (ctx {ctx})", f"{d['macs_per_token']:,}", f"{p['macs_per_token']:,}",
         f"{1 / result['speedup']['macs']:.3f}"],
        ["weight memory (MB)", f"{d['weight_bytes'] / 1e6:.1f}", f"{p['weight_bytes'] / 1e6:.1f}",
         f"{1 / result['speedup']['weight_bytes']:.3f}"],
    ]
    for key in d["median_s"]:
        label = "decode b1 tok/s" if key == "decode" else key.replace("_b", " b") + " tok/s"
        rows.append([label, f"{d[f'{key}_tok_s']:.1f}", f"{p[f'{key}_tok_s']:.1f}", f"{result['speedup'][key]:.3f}"])
    return format_table(rows, ["metric", "dense", "pruned", "pruned/dense"])


# -- command line --------------------------------------------------------------------------------------
def resolve_device(name: str) -> str:
    """The device as torch names it (``cuda:0``), resolved by daprune's one device resolver."""
    from daprune.devices import resolve_device as resolve

    return str(resolve(name))


def baseline_source(model_dir: str) -> str:
    """The dense original recorded in the pruned folder's report.json."""
    report = Path(model_dir) / "report.json"
    if not report.is_file():
        raise ConfigError(f"{model_dir} has no report.json; pass --baseline")
    source = json.loads(report.read_text()).get("model_source")
    if not source or not source.get("origin"):
        raise ConfigError(f"{report} does not record the model source; pass --baseline")
    return source["origin"]


def load_for_bench(source: str, dtype: str, device: str, cache: str | None = None) -> nn.Module:
    """Any model source; local folders go through daprune.loader so non-uniform ones need no remote code."""
    from daprune.loader import load_pruned
    from daprune.models.loading import load_model, resolve_source

    src = resolve_source(source, cache)
    if src.kind == "hub":
        return load_model(source, dtype=dtype, device=device, cache=cache)[0]
    return load_pruned(src.path, dtype=dtype, device=device)[0]
