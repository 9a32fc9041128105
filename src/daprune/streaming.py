"""Pruning models larger than memory: one decoder block at a time, straight from the safetensors files.

Why: the in-memory path holds the whole dense model (plus a pruned copy of one block). A 70B model does
not fit in RAM, yet the pruning algorithm only ever needs one block and the two activation streams.
So in streaming mode:

* the model is built on the ``meta`` device (``accelerate.init_empty_weights``): the module tree and
  shapes exist, no weight memory is allocated (rotary buffers, which are computed, stay real);
* :class:`WeightsReader` opens the checkpoint's safetensors shards (``model.safetensors.index.json``
  for sharded checkpoints) and reads only the tensors asked for, via ``safetensors.safe_open``;
* :class:`StreamingStore` materialises one block on the compute device, hands it to the pipeline, then
  writes the pruned block as its own shard into the work folder and turns the block back into meta
  tensors (keeping the pruned shapes, so the config can still be updated from the skeleton);
* :func:`write_streaming_output` assembles the output folder inside ``io.atomic_dir``: embedding shard,
  the block shards (hard-linked from the work folder), final norm / lm_head, a sharded
  ``model.safetensors.index.json``, config, generation config, tokenizer. Tied embeddings write no
  ``lm_head.weight``, exactly like ``save_pretrained``.

Peak memory is about one dense block + its working copy + two activation streams + (briefly) the
embedding matrix, independent of depth. The same code paths (block load, prune, forward) as the
in-memory run are used in the same order, so the output weights are bit-identical to it.

:class:`ResidentStore` is the in-memory counterpart (the whole model already loaded), so the pipeline
has one block loop for both. :class:`Activations` decides where the streams live: on the compute
device, in CPU memory, or memory-mapped files in the work folder (``--activations disk``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from daprune.errors import ConfigError, CorruptWeightsError, DeviceError, WeightsMismatchError
from daprune.models.adapter import BlockAdapter, ModelAdapter
from daprune.models.layer_inputs import capture_layer_inputs

log = logging.getLogger(__name__)

INDEX_FILE = "model.safetensors.index.json"
ACTIVATION_MODES = ("device", "cpu", "disk")
# tensors some checkpoints carry that current transformers recompute (never weights): ignored when present
_IGNORED_EXTRA = ("rotary_emb.inv_freq",)


# -- devices --------------------------------------------------------------------------------------------------
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
    :meth:`StreamingStore.load` then runs it through accelerate's ``dispatch_model``. A block that fits
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


# -- reading checkpoints --------------------------------------------------------------------------------------
class WeightsReader:
    """Lazy, validated access to a folder's safetensors weights; opening it reads headers only.

    A truncated shard, a file that is not safetensors, or an index naming a missing shard raises
    :class:`CorruptWeightsError` here, before any work, instead of deep inside ``from_pretrained``.
    """

    def __init__(self, folder: str | os.PathLike):
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX_FILE
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (ValueError, KeyError, TypeError) as exc:
                raise CorruptWeightsError(f"{index} is not a valid safetensors index: {exc}") from exc
            files = sorted({self.folder / f for f in weight_map.values()})
            missing = [f.name for f in files if not f.is_file()]
            if missing:
                raise CorruptWeightsError(f"{index} names shard(s) that do not exist: {', '.join(missing[:3])}")
        else:
            files = sorted(self.folder.glob("*.safetensors"))
        self.files = files
        self.file_key: dict[str, str] = {}  # the model's name of a tensor -> its name in the checkpoint
        self.where: dict[str, Path] = {}
        self.shapes: dict[str, tuple[int, ...]] = {}
        for f in files:
            try:
                with safe_open(str(f), framework="pt") as fh:
                    names = fh.keys()  # safe_open handles are not iterable
                    for key in names:
                        self.where[key] = f
                        self.file_key[key] = key
                        self.shapes[key] = tuple(fh.get_slice(key).get_shape())
            except Exception as exc:  # safetensors raises its own error type (and OSError for unreadable files)
                raise CorruptWeightsError(
                    f"cannot read weights file {f}: {exc} (the file is truncated, corrupt or not safetensors; "
                    "re-download or re-save the model)"
                ) from exc

    @property
    def available(self) -> bool:
        return bool(self.files)

    def get_many(self, keys: Iterable[str], dtype: torch.dtype | None = None,
                 device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """Read ``keys`` (one open per shard), cast floating tensors to ``dtype``, move to ``device``."""
        from safetensors import safe_open

        by_file: dict[Path, list[str]] = {}
        for k in keys:
            if k not in self.where:
                raise WeightsMismatchError(f"tensor {k} is missing from the weights in {self.folder}")
            by_file.setdefault(self.where[k], []).append(k)
        out = {}
        for f, ks in by_file.items():
            try:
                with safe_open(str(f), framework="pt", device="cpu") as fh:
                    for k in ks:
                        t = fh.get_tensor(self.file_key[k])
                        if dtype is not None and t.is_floating_point() and t.dtype != dtype:
                            t = t.to(dtype)
                        out[k] = t.to(device)
            except (WeightsMismatchError, CorruptWeightsError):
                raise
            except Exception as exc:
                raise CorruptWeightsError(f"cannot read {', '.join(ks[:2])} from {f}: {exc}") from exc
        return {k: out[k] for k in keys}

    def check_against(self, model: nn.Module) -> None:
        """Every tensor the model (skeleton) expects is present with the shape its config implies.

        ``from_pretrained`` would silently random-initialise missing tensors; that must be an error here.
        Checkpoint names are first mapped to the model's with transformers' renaming rules for the family.
        """
        from daprune.models.checkpoint_keys import renamer

        rename = renamer(model)
        old = (self.where, self.shapes, self.file_key)
        self.where = {rename(k): v for k, v in old[0].items()}
        self.shapes = {rename(k): v for k, v in old[1].items()}
        self.file_key = {rename(k): v for k, v in old[2].items()}
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        tied = tied_lm_head_key(model)
        missing = [k for k in expected if k not in self.shapes and k != tied]
        wrong = [f"{k} is {list(self.shapes[k])} in the file but the config implies {list(s)}"
                 for k, s in expected.items() if k in self.shapes and self.shapes[k] != s]
        if missing or wrong:
            parts = []
            if missing:
                parts.append(f"{len(missing)} tensor(s) missing (e.g. {', '.join(missing[:3])})")
            if wrong:
                parts.append(f"{len(wrong)} of the wrong shape ({'; '.join(wrong[:2])})")
            raise WeightsMismatchError(f"the weights in {self.folder} do not match its config.json: "
                                       f"{' and '.join(parts)}")
        extra = [k for k in self.shapes if k not in expected and not k.endswith(_IGNORED_EXTRA)]
        if extra:
            log.warning("ignoring %d tensor(s) the model does not use (e.g. %s)", len(extra), extra[:3])


# -- module surgery helpers ------------------------------------------------------------------------------------
def module_name(root: nn.Module, target: nn.Module) -> str:
    for name, mod in root.named_modules():
        if mod is target:
            return name
    raise ValueError("module not found in the model")


def param_name(root: nn.Module, target: torch.Tensor) -> str:
    for name, p in root.named_parameters():
        if p is target:
            return name
    raise ValueError("parameter not found in the model")


def tied_lm_head_key(model: nn.Module) -> str | None:
    """Name of the output embedding weight when it is the same tensor as the input embedding."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    inp = model.get_input_embeddings()
    if out is None or out.weight is not inp.weight:
        return None
    for name, p in model.named_parameters(remove_duplicate=False):
        if p is out.weight and name != param_name(model, inp.weight):
            return name
    return None


def assign_tensors(module: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Put ``tensors`` (names relative to ``module``) in place as parameters/buffers, adding missing biases."""
    for name, t in tensors.items():
        parent, _, attr = name.rpartition(".")
        mod = module.get_submodule(parent) if parent else module
        if attr in mod._buffers:
            mod._buffers[attr] = t
            continue
        old = mod._parameters.get(attr)
        if old is None and attr not in mod._parameters and not (attr == "bias" and isinstance(mod, nn.Linear)):
            raise WeightsMismatchError(f"unexpected tensor {name} for module {type(mod).__name__}")
        grad = old.requires_grad if old is not None else getattr(mod, "weight", t).requires_grad
        setattr(mod, attr, nn.Parameter(t, requires_grad=grad and t.is_floating_point()))


def save_block(path: Path, prefix: str, block: BlockAdapter) -> None:
    """Checkpoint a finished block: its tensors in native form, and beside them its shape record.

    The record (a JSON file, written first) lets a resumed run rebuild the block's shapes and layout
    attributes with the same function the loaders use. It is not safetensors metadata, whose key order
    is not stable, so the shard's bytes would differ between identical runs.
    """
    from daprune.checkpoint import atomic_save_tensors, atomic_write_json

    atomic_write_json(path.with_suffix(".json"), block.record())  # leaves the block in native form
    atomic_save_tensors(path, {prefix + k: v for k, v in block.layer.state_dict().items()})


def record_of(path: Path) -> dict:
    """The shape record saved with a block checkpoint (see :func:`save_block`)."""
    from daprune.errors import ResumeError

    side = path.with_suffix(".json")
    if not side.is_file():
        raise ResumeError(f"{path} was written by an older daprune without block shapes; rerun with --no-resume")
    return json.loads(side.read_text())


def trim_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Why: glibc keeps freed chunks of the block just pruned in its heap, and the next block's large
    temporaries land partly in fresh memory, so without this the resident set creeps up block after
    block (measured: +0.9 GiB over 16 blocks of width 1024/4096) although nothing leaks.
    """
    global _LIBC
    if _LIBC is None:
        import ctypes
        import ctypes.util

        try:
            _LIBC = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
            _LIBC.malloc_trim  # noqa: B018  (raises AttributeError without glibc)
        except (OSError, AttributeError):
            _LIBC = False
    if _LIBC:
        _LIBC.malloc_trim(0)


_LIBC = None


def count_parameters(model: nn.Module) -> int:
    """Unique parameters (tied ones once); unlike data_ptr-based counting it also works on meta tensors."""
    return sum(p.numel() for p in model.parameters())


# -- activation streams ----------------------------------------------------------------------------------------
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


# -- block stores ----------------------------------------------------------------------------------------------
class ResidentStore:
    """The whole model is in memory already: blocks need no loading; checkpoints still save block tensors."""

    streaming = False

    def __init__(self, adapter: ModelAdapter, acts: Activations | None = None):
        self.adapter = adapter
        dev = next(adapter.model.parameters()).device
        self.acts = acts or Activations("device", dev)
        self.device = self.acts.exec_device
        self.prefix = module_name(adapter.model, adapter.layers())
        self._hooks: dict[int, list] = {}

    def block_prefix(self, i: int) -> str:
        return f"{self.prefix}.{i}."

    def outside_layers(self) -> contextlib.AbstractContextManager:
        """Context in which the model's tensors outside its layers (embeddings, final norm) are real."""
        return contextlib.nullcontext()

    def embed(self, ids: torch.Tensor, bs: int) -> torch.Tensor:
        """What the model feeds its first layer (embedding, scaling, learned positions), batch by batch."""
        with self.outside_layers():
            x = torch.cat([self._first_hidden(ids[s : s + bs]) for s in range(0, ids.shape[0], bs)])
        return self.acts.adopt(x, "embed")

    def _first_hidden(self, ids: torch.Tensor) -> torch.Tensor:
        return capture_layer_inputs(self.adapter.model, self.adapter.layers(), ids.to(self.device), upto=0)[0]

    def layer_inputs(self, seqlen: int) -> list[dict]:
        """Per layer, the arguments the model passes it for one sequence of ``seqlen`` tokens.

        Captured once from the model's own forward (masks, rotary tables per layer type): they depend only
        on the length, and broadcast over any batch size.
        """
        ids = torch.zeros(1, seqlen, dtype=torch.long, device=self.device)
        with self.outside_layers():
            return capture_layer_inputs(self.adapter.model, self.adapter.layers(), ids)[1]

    def load(self, i: int) -> BlockAdapter:
        if i not in self._hooks:
            self._hooks[i] = self.acts.hook(self.adapter.layers()[i])
        block = self.adapter.block(i)
        block.to_canonical()
        return block

    def release(self, i: int) -> None:
        for h in self._hooks.pop(i, []):
            h.remove()

    def finish(self, i: int, path: Path | None) -> None:
        self.release(i)
        block = self.adapter.block(i)
        block.to_native()
        if path is not None:
            save_block(path, self.block_prefix(i), block)

    def restore(self, i: int, path: Path) -> None:
        """Replace block ``i`` by its pruned tensors from an interrupted run's checkpoint."""
        from safetensors.torch import load_file

        from daprune.io_templates.modeling_daprune import resize_block

        pre = self.block_prefix(i)
        tensors = {k[len(pre):]: v for k, v in load_file(str(path)).items()}
        layer = self.adapter.layers()[i]
        dev = next(layer.parameters()).device
        resize_block(layer, record_of(path))
        assign_tensors(layer, {k: v.to(dev) for k, v in tensors.items()})


class StreamingStore(ResidentStore):
    """Blocks live on disk; one at a time is materialised (see the module docstring)."""

    streaming = True

    def __init__(self, adapter: ModelAdapter, reader: WeightsReader, dtype: torch.dtype, placement: Placement,
                 acts: Activations):
        self.adapter = adapter
        self.reader = reader
        self.dtype = dtype
        self.placement = placement
        self.acts = acts
        self.device = placement.device
        self.prefix = module_name(adapter.model, adapter.layers())
        self._hooks = {}
        self._loaded: set[int] = set()
        model = adapter.model
        # computed buffers (rotary frequencies) are real tensors on the skeleton: move them to the device
        for mod in model.modules():
            for k, b in list(mod._buffers.items()):
                if b is not None and b.device.type != "meta":
                    mod._buffers[k] = b.to(self.device)

    @contextlib.contextmanager
    def outside_layers(self) -> Iterator[None]:
        """Read the tensors outside the layers (not an untied LM head) for the occasion, then drop them."""
        model = self.adapter.model
        out_emb = model.get_output_embeddings()
        tied = out_emb is None or out_emb.weight is model.get_input_embeddings().weight
        skip = set() if tied else {id(out_emb.weight)}
        layers = self.prefix + "."
        saved = {n: p for n, p in model.named_parameters() if not n.startswith(layers) and id(p) not in skip}
        assign_tensors(model, self.reader.get_many(list(saved), self.dtype, self.device))
        try:
            yield
        finally:  # back to the skeleton's own (meta) Parameters, so a tied lm_head stays tied
            for n, p in saved.items():
                parent, _, attr = n.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, p)

    def load(self, i: int) -> BlockAdapter:
        if i in self._loaded:
            return self.adapter.block(i)
        layer = self.adapter.layers()[i]
        self.adapter.block(i).to_native()  # tensors are read under the family's own names
        pre = self.block_prefix(i)
        keys = [pre + k for k in layer.state_dict()]
        on = self.device if self.placement.device_map is None else torch.device("cpu")
        tensors = {k[len(pre):]: v for k, v in self.reader.get_many(keys, self.dtype, on).items()}
        block = self.adapter.block(i)
        assign_tensors(layer, tensors)  # the skeleton already has the source's (maybe per-layer) shapes
        del tensors
        block.to_canonical()  # before dispatch: accelerate's hooks must sit on the modules that run
        if self.placement.device_map is not None:
            self._dispatch(layer, self.placement.device_map)
        self._hooks[i] = self.acts.hook(layer)
        self._loaded.add(i)
        return block

    @staticmethod
    def _dispatch(layer: nn.Module, device_map: dict[str, int | str]) -> None:
        """Spread a block (real tensors on the CPU) over ``device_map`` with accelerate's ``dispatch_model``.

        Two adjustments, both through accelerate's own options and hooks:

        * ``main_device`` is ``"cpu"`` when the map uses the CPU. With a GPU as main device, dispatch_model
          would *offload* the map's ``"cpu"`` parts (weights on the meta device, streamed in per forward),
          and the pruner must see real weights; with ``"cpu"`` they stay resident and execute on the CPU.
          ``force_hooks`` gives a one-device map the same hooks (the CPU-only test relies on it).
        * Each part returns its output to its input's device (``io_same_device``). accelerate sets that
          only for the top module, because its maps never split a decoder layer; here the parts are
          children of one layer, whose own forward adds their outputs to the residual stream.
        """
        from accelerate import dispatch_model

        gpus = sorted(d for d in device_map.values() if isinstance(d, int))
        main = "cpu" if "cpu" in device_map.values() or not gpus else torch.device("cuda", gpus[0])
        dispatch_model(layer, device_map=device_map, main_device=main, force_hooks=True)
        for name in device_map:
            hook = getattr(layer.get_submodule(name), "_hf_hook", None)
            if hook is not None and hasattr(hook, "io_same_device"):
                hook.io_same_device = True

    def release(self, i: int) -> None:
        """Drop block ``i``'s tensors, keeping its (possibly pruned) shapes on the meta device."""
        super().release(i)
        if i in self._loaded:
            layer = self.adapter.layers()[i]
            if self.placement.device_map is not None:
                from accelerate.hooks import remove_hook_from_module

                remove_hook_from_module(layer, recurse=True)
                layer.__dict__.pop("hf_device_map", None)
            layer.to("meta")
            self._loaded.discard(i)
            trim_heap()

    def finish(self, i: int, path: Path | None) -> None:
        if path is None:
            raise ConfigError("streaming mode needs a work folder for the block shards")
        trim_heap()  # the pruner's freed temporaries first: serialising copies the block once more
        save_block(path, self.block_prefix(i), self.adapter.block(i))
        self.release(i)

    def restore(self, i: int, path: Path) -> None:
        """Give meta block ``i`` the pruned shapes saved by an interrupted run (headers only, no data)."""
        from safetensors import safe_open

        from daprune.io_templates.modeling_daprune import resize_block

        pre = self.block_prefix(i)
        with safe_open(str(path), framework="pt") as fh:
            names = fh.keys()
            shapes = {k[len(pre):]: tuple(fh.get_slice(k).get_shape()) for k in names}
        layer = self.adapter.layers()[i]
        resize_block(layer, record_of(path))
        assign_tensors(layer, {k: torch.empty(s, dtype=self.dtype, device="meta") for k, s in shapes.items()})


class LoadingAdapter:
    """A ModelAdapter view whose ``block(i)`` materialises block i (releasing the previous one).

    Lets code written for resident models, like the adaptive schedule's dense pass over all blocks, run
    in streaming mode with one block in memory.
    """

    def __init__(self, adapter: ModelAdapter, store: ResidentStore):
        self._adapter = adapter
        self._store = store
        self._current: int | None = None

    def __getattr__(self, name: str):
        return getattr(self._adapter, name)

    def block(self, index: int, layer: nn.Module | None = None) -> BlockAdapter:
        if layer is not None:
            return self._adapter.block(index, layer)
        if self._current is not None and self._current != index:
            self._store.release(self._current)
        self._current = index
        return self._store.load(index)

    def close(self) -> None:
        if self._current is not None:
            self._store.release(self._current)
            self._current = None


# -- skeleton and output ----------------------------------------------------------------------------------------
def build_skeleton(folder: str | os.PathLike, dtype: torch.dtype) -> nn.Module:
    """The model's module tree on the meta device (shapes only), with the folder's generation config."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig

    from daprune.errors import ModelSourceError
    from daprune.io import reshape_layers
    from daprune.models.adapter import get_adapter

    folder = Path(folder)
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as exc:
        raise ModelSourceError(f"cannot read the model config of {folder}: {exc}") from exc
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # on meta tensors from_config leaves tied embeddings as two Parameters; tie them again
    model.eval()
    if (folder / "generation_config.json").is_file():
        try:
            model.generation_config = GenerationConfig.from_pretrained(folder)
        except Exception as exc:  # a broken generation config should not stop pruning
            log.warning("ignoring unreadable generation_config.json: %s", exc)
    layers = getattr(config, "daprune_layers", None)
    # a daprune output used as source: give the skeleton its per-layer shapes and extra (FLAP) biases
    reshape_layers(get_adapter(model), layers or None)
    return model


def _shard_name(k: int, total: int) -> str:
    return f"model-{k:05d}-of-{total:05d}.safetensors"


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # another filesystem (--work-dir elsewhere) or no hard links: copy
        shutil.copyfile(src, dst)


def write_streaming_output(store: StreamingStore, block_file, tmp: Path) -> None:
    """Write the weights of a streamed, pruned model into the (atomic temp) folder ``tmp``.

    ``block_file(i)`` is the work folder's shard of pruned block i. Shards: embedding, one per block,
    then everything else (final norm, an untied lm_head). Blocks lacking the zero biases that
    ``update_config`` made model-wide (FLAP compensation on some blocks) are rewritten with them.
    """
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    model, adapter, reader = store.adapter.model, store.adapter, store.reader
    n = adapter.n_layers
    total = n + 2
    expected = model.state_dict()  # meta tensors: names, pruned shapes, dtypes
    tied = tied_lm_head_key(model)
    emb_key = param_name(model, model.get_input_embeddings().weight)
    weight_map: dict[str, str] = {}
    meta = {"format": "pt"}

    save_file(reader.get_many([emb_key], store.dtype), str(tmp / _shard_name(1, total)), metadata=meta)
    weight_map[emb_key] = _shard_name(1, total)

    for i in range(n):
        src, dst = block_file(i), tmp / _shard_name(i + 2, total)
        pre = store.block_prefix(i)
        want = {k: v for k, v in expected.items() if k.startswith(pre)}
        with safe_open(str(src), framework="pt") as fh:
            have = set(fh.keys())
        missing = [k for k in want if k not in have]
        if missing:
            if not all(k.endswith(".bias") for k in missing):
                raise WeightsMismatchError(f"block {i} checkpoint lacks {missing[:3]}")
            tensors = load_file(str(src))
            for k in missing:
                tensors[k] = torch.zeros(want[k].shape, dtype=want[k].dtype)
            save_file({k: tensors[k] for k in want}, str(dst), metadata=meta)
        else:
            _link_or_copy(src, dst)
        for k in want:
            weight_map[k] = dst.name

    rest = [k for k in expected if not k.startswith(store.prefix + ".") and k not in (emb_key, tied)]
    save_file(reader.get_many(rest, store.dtype), str(tmp / _shard_name(total, total)), metadata=meta)
    weight_map.update({k: _shard_name(total, total) for k in rest})

    size = sum(v.numel() * v.element_size() for k, v in expected.items() if k != tied)
    index = {"metadata": {"total_size": size}, "weight_map": dict(sorted(weight_map.items()))}
    (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(tmp)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(tmp)
