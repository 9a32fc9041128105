"""Where the work runs: the compute device named by ``--device``, and where each block is placed.

Why a module of its own: the device is resolved before any weight is read (asking for a GPU on a
CPU-only machine fails in a second), and the placement of a block (one device, or accelerate's device
map over several GPUs when one block fits on none) is decided once per run from the first block's size.
:class:`daprune.stores.StreamingStore` then follows the :class:`Placement`.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass

import torch
from torch import nn

from daprune.errors import DeviceError

log = logging.getLogger(__name__)


def resolve_device(spec: str | torch.device | None) -> torch.device:
    """``cpu`` | ``cuda`` | ``cuda:N`` | ``mps`` | ``auto`` (the first GPU if one is visible, else the CPU).

    Checked before any weight is read, so asking for a GPU on a CPU-only machine fails in a second.
    """
    spec = str(spec or "cpu").strip().lower()
    if spec == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        return torch.device("cpu")
    try:
        dev = torch.device(spec)
    except RuntimeError:
        raise DeviceError(f"unknown --device {spec!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError(f"--device {spec}: no CUDA device is visible on this machine; use --device cpu or auto")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise DeviceError(f"--device {spec}: only {torch.cuda.device_count()} CUDA device(s) visible")
        return torch.device("cuda", index)
    if dev.type == "mps" and torch.backends.mps.is_available():
        return dev
    raise DeviceError(f"--device {spec} is not available here; use cpu, cuda, cuda:N or auto")


HALF_PRECISION = ("bfloat16", "float16")


def slow_half_precision(dtype: str, device: str | torch.device) -> str | None:
    """Why ``dtype`` would be slow on ``device``, or None.

    PyTorch's CPU kernels for bf16/fp16 matmuls are fast on x86 CPUs with AVX-512 (best with its bf16 or AMX
    extensions); on one with AVX2 alone they have no fast path and run several times slower than fp32
    (measured: benchmarks/dtype_bench.py, docs/dtype_speed.md). A user who asks for bf16 to save time
    would get the opposite, silently; so the choice is checked, not assumed.
    """
    dtype = str(dtype).removeprefix("torch.")
    if dtype not in HALF_PRECISION or torch.device(device).type != "cpu":
        return None
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return None  # ARM and others: no kernel table known to us; not guessed
    capability = torch.backends.cpu.get_cpu_capability()
    if capability.upper().startswith("AVX512"):
        return None
    return (f"--dtype {dtype} on this CPU ({capability}, no AVX-512) runs matmuls several times slower than "
            "float32; use --dtype float32 unless memory, not time, is the limit")


@functools.cache
def warn_slow_half_precision(dtype: str, device: str) -> None:
    """Log :func:`slow_half_precision`'s reason once per process (prune and eval may both ask)."""
    reason = slow_half_precision(dtype, device)
    if reason:
        log.warning(reason)


@dataclass
class Placement:
    """Where a block runs: one device, or (``device_map``) its submodules spread over several GPUs."""

    device: torch.device
    device_map: dict[str, str | int] | None = None


def plan_placement(spec: str, layer: nn.Module, dtype: torch.dtype, *,
                   free_memory: dict[int | str, int] | None = None, headroom: float = 3.0) -> Placement:
    """Choose where each block runs.

    One device whenever a block fits: spreading a block over GPUs only adds transfers. Only for
    ``--device auto`` with several GPUs, and a block whose ``headroom`` x size (block + its dense copy +
    working memory) exceeds every single GPU's free memory, the block is spread by accelerate's
    ``infer_auto_device_map`` over the GPUs (budget: free memory / ``headroom`` each), with the CPU
    (``"cpu"`` in ``free_memory``; measured free RAM by default) as last resort; see :func:`block_device_map`.
    :meth:`daprune.stores.StreamingStore.load` then runs it through accelerate's ``dispatch_model``. A block that fits
    nowhere but the CPU runs wholly on the CPU; one that does not fit even there is a :class:`DeviceError`.
    That multi-GPU path is only tested with simulated memory figures (no multi-GPU machine in CI).
    """
    device = resolve_device(spec)
    if str(spec).strip().lower() != "auto" or device.type != "cuda":
        return Placement(device)
    if free_memory is None:
        import psutil  # an accelerate dependency

        free_memory = {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}
        free_memory["cpu"] = psutil.virtual_memory().available
    from accelerate.utils import compute_module_sizes

    gpus = {k: v for k, v in free_memory.items() if isinstance(k, int)}
    size = compute_module_sizes(layer, dtype=dtype)[""]
    best = max(gpus, key=lambda i: gpus[i])
    if size * headroom <= gpus[best] or len(gpus) < 2:
        return Placement(torch.device("cuda", best))
    device_map = block_device_map(layer, dtype, {k: int(m / headroom) for k, m in free_memory.items()})
    used = set(device_map.values())
    if "disk" in used:
        where = "the visible GPUs and the free CPU memory" if "cpu" in free_memory else "the visible GPUs"
        raise DeviceError(f"one block needs ~{size / 2**30:.1f} GiB plus working memory, more than {where} offer "
                          f"(accelerate's device map for it: {dict(device_map)}); use --device cpu")
    on_gpus = sorted(d for d in used if isinstance(d, int))
    if not on_gpus:
        log.warning("one block (~%.1f GiB plus working memory) fits on none of the GPUs: blocks run on the CPU",
                    size / 2**30)
        return Placement(torch.device("cpu"))
    if len(used) == 1:
        return Placement(torch.device("cuda", on_gpus[0]))
    log.info("blocks are spread over devices: %s", dict(device_map))
    return Placement(torch.device("cuda", on_gpus[0]), dict(device_map))


def block_device_map(layer: nn.Module, dtype: torch.dtype, max_memory: dict[int | str, int]) -> dict[str, int | str]:
    """accelerate's ``infer_auto_device_map`` for one block, its attention and FFN kept whole.

    Every child of the block that has submodules (attention, MLP) is a no-split class, so each one's
    linears stay together on one device and the pruner's per-module math never mixes devices. Names in
    the map are relative to ``layer``; ``"disk"`` in it means the budgets do not suffice.
    """
    from accelerate import infer_auto_device_map

    whole = sorted({type(m).__name__ for _, m in layer.named_children() if next(m.children(), None) is not None})
    return dict(infer_auto_device_map(layer, max_memory=dict(max_memory), no_split_module_classes=whole,
                                      dtype=dtype))
