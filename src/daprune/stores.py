"""Block stores: where the pipeline gets each decoder block from and where a finished block goes.

Why: the in-memory path holds the whole dense model (plus a pruned copy of one block). A 70B model does
not fit in RAM, yet the pruning algorithm only ever needs one block and the two activation streams.
Both modes share one block loop (:func:`daprune.pipeline.run_pipeline`) through a store:

* :class:`ResidentStore`: the whole model is loaded already; blocks need no loading, finished blocks
  are still checkpointed to the work folder (:func:`save_block`) so an interrupted run can resume;
* :class:`StreamingStore`: the model is a skeleton on the ``meta`` device
  (:func:`daprune.loader.build_skeleton`: module tree and shapes, no weight memory; computed rotary
  buffers stay real). It materialises one block on the compute device from the safetensors files
  (:class:`daprune.weights.WeightsReader`), hands it to the pipeline, then writes the pruned block as its
  own shard into the work folder and turns the block back into meta tensors (keeping the pruned shapes,
  so the config can still be updated from the skeleton). Those shards become the output's block shards
  (:func:`daprune.output.write_streaming_output`).

Peak memory is about one dense block + its working copy + two activation streams + (briefly) the
embedding matrix, independent of depth. The same code paths (block load, prune, forward) as the
in-memory run are used in the same order, so the output weights are bit-identical to it.
:class:`LoadingAdapter` lets code written for resident models visit blocks through a store.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from daprune.activations import Activations
from daprune.atomic import atomic_save_tensors, atomic_write_json
from daprune.devices import Placement
from daprune.errors import ConfigError, ResumeError
from daprune.models.adapter import BlockAdapter, ModelAdapter
from daprune.models.layer_inputs import capture_layer_inputs
from daprune.weights import WeightsReader, assign_tensors, module_name


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

    def outside_layers(self, head: bool = False) -> contextlib.AbstractContextManager:
        """Context in which the model's tensors outside its layers (embeddings, final norm; with ``head`` an
        untied LM head too) are real."""
        return contextlib.nullcontext()

    def embed(self, ids: torch.Tensor, bs: int, tag: str = "embed") -> torch.Tensor:
        """What the model feeds its first layer (embedding, scaling, learned positions), batch by batch."""
        with self.outside_layers():
            x = torch.cat([self._first_hidden(ids[s : s + bs]) for s in range(0, ids.shape[0], bs)])
        return self.acts.adopt(x, tag)

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
    def outside_layers(self, head: bool = False) -> Iterator[None]:
        """Read the tensors outside the layers (an untied LM head only with ``head``) for the occasion, then
        drop them."""
        model = self.adapter.model
        out_emb = model.get_output_embeddings()
        tied = out_emb is None or out_emb.weight is model.get_input_embeddings().weight
        skip = set() if tied or head else {id(out_emb.weight)}
        layers = self.prefix + "."
        saved = {n: p for n, p in model.named_parameters() if not n.startswith(layers) and id(p) not in skip}
        retie = head and tied and out_emb is not None
        head_weight = out_emb.weight if retie else None
        assign_tensors(model, self.reader.get_many(list(saved), self.dtype, self.device))
        if retie:  # the new embedding Parameter is not the head's: tie them again for the occasion
            out_emb.weight = model.get_input_embeddings().weight
        try:
            yield
        finally:  # back to the skeleton's own (meta) Parameters, so a tied lm_head stays tied
            for n, p in saved.items():
                parent, _, attr = n.rpartition(".")
                setattr(model.get_submodule(parent) if parent else model, attr, p)
            if head_weight is not None:
                out_emb.weight = head_weight

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


def save_block(path: Path, prefix: str, block: BlockAdapter) -> None:
    """Checkpoint a finished block: its tensors in native form, and beside them its shape record.

    The record (a JSON file, written first) lets a resumed run rebuild the block's shapes and layout
    attributes with the same function the loaders use. It is not safetensors metadata, whose key order
    is not stable, so the shard's bytes would differ between identical runs.
    """
    atomic_write_json(path.with_suffix(".json"), block.record())  # leaves the block in native form
    atomic_save_tensors(path, {prefix + k: v for k, v in block.layer.state_dict().items()})


def record_of(path: Path) -> dict:
    """The shape record saved with a block checkpoint (see :func:`save_block`)."""
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
