"""Where the two activation streams (pruned and dense) live while blocks are pruned.

Why: the streams are the pipeline's largest data after the block itself (``nsamples x seqlen x hidden``
each), and where they fit decides what a run can do: on the compute device (fastest), in CPU memory
(a GPU holds only the block), or memory-mapped files in the work folder (``--activations disk``: RAM
holds what is touched, and the files double as the resume checkpoint).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from daprune.errors import ConfigError
from daprune.models.adapter import BlockAdapter

ACTIVATION_MODES = ("device", "cpu", "disk")


class Activations:
    """Where the pruned/dense streams live: the compute device, CPU memory, or mmap files (``disk``).

    With ``cpu``/``disk`` and a GPU block, forward hooks move each batch to the GPU and its output back,
    so the pipeline never needs both full streams in GPU memory. ``disk`` streams are files written
    through ``torch.from_file(shared=True)``: the OS pages them in and out, so RAM holds what is touched,
    and the files double as the resume checkpoint (fsynced, not copied).
    """

    def __init__(self, mode: str, device: torch.device, folder: Path | None = None):
        if mode not in ACTIVATION_MODES:
            raise ConfigError(f"--activations must be one of {', '.join(ACTIVATION_MODES)}, got {mode!r}")
        if mode == "disk" and folder is None:
            raise ConfigError("--activations disk needs a work folder (give an output folder or --work-dir)")
        self.mode = mode
        self.exec_device = device
        self.device = device if mode == "device" else torch.device("cpu")
        self.folder = folder
        self._files: list[tuple[torch.Tensor, Path]] = []

    @property
    def moves(self) -> bool:
        return self.device != self.exec_device

    def _file(self, tag: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        assert self.folder is not None
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{tag}.bin"
        path.unlink(missing_ok=True)  # a killed attempt may have left a partial one
        n = 1
        for d in shape:
            n *= d
        t = torch.from_file(str(path), shared=True, size=n, dtype=dtype).view(shape)
        self._files.append((t, path))
        return t

    def adopt(self, t: torch.Tensor, tag: str) -> torch.Tensor:
        """Place an existing stream (embedding output, a restored checkpoint) in this storage."""
        if self.mode != "disk":
            return t.to(self.device)
        if self.file_of(t) is not None:
            return t
        out = self._file(tag, tuple(t.shape), t.dtype)
        out.copy_(t)
        return out

    def empty(self, tag: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A new stream-sized tensor in this storage (a file under ``disk``), to be filled batch by batch."""
        if self.mode != "disk":
            return torch.empty(shape, dtype=dtype, device=self.device)
        return self._file(tag, shape, dtype)

    def drop(self, t: torch.Tensor) -> None:
        """Forget a stream this storage holds, deleting its file now (no checkpoint refers to it)."""
        for u, p in self._files:
            if u is t:
                p.unlink(missing_ok=True)
        self._files = [(u, p) for u, p in self._files if u is not t]

    def register(self, t: torch.Tensor, path: Path) -> None:
        """A restored mmap stream: remember its file so it is deleted once superseded."""
        self._files.append((t, path))

    def forward(self, block: BlockAdapter, x: torch.Tensor, ctx: dict, bs: int, tag: str) -> torch.Tensor:
        """The block's output on the whole stream, batch by batch, into this storage."""
        if self.mode != "disk":
            return torch.cat([block.forward(x[s : s + bs], ctx) for s in range(0, x.shape[0], bs)])
        out = None
        for s in range(0, x.shape[0], bs):
            y = block.forward(x[s : s + bs], ctx)
            if out is None:
                out = self._file(tag, (x.shape[0], *y.shape[1:]), y.dtype)
            out[s : s + y.shape[0]].copy_(y)
        assert out is not None
        return out

    def file_of(self, t: torch.Tensor | None) -> Path | None:
        for u, p in self._files:
            if u is t:
                return p
        return None

    def gc(self, keep: Iterable[torch.Tensor | None]) -> None:
        """Delete the files of streams no longer referenced (call after the checkpoint that drops them)."""
        keep = [k for k in keep if k is not None]
        alive = []
        for t, p in self._files:
            if any(t is k for k in keep):
                alive.append((t, p))
            else:
                p.unlink(missing_ok=True)
        self._files = alive

    def hook(self, layer: nn.Module) -> list:
        """Move a block's input to the compute device and its output to the stream storage."""
        if not self.moves:
            return []
        exec_dev, store_dev = self.exec_device, self.device

        def pre(_m, args, kwargs):
            return tuple(a.to(exec_dev) if torch.is_tensor(a) else a for a in args), kwargs

        def post(_m, _args, out):
            if isinstance(out, tuple):
                return (out[0].to(store_dev), *out[1:])
            return out.to(store_dev)

        return [layer.register_forward_pre_hook(pre, with_kwargs=True), layer.register_forward_hook(post)]
