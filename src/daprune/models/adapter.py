"""The interface between the pruning algorithm and a model family.

Everything that knows module names lives behind :class:`ModelAdapter` and :class:`BlockAdapter`;
the pipeline, criteria and recovery only see linears, activations and index sets. An adapter states
*structure only*: which linears are the level-1 and level-2 ends of the two depth-2 units of a block
(attention: q, k, v -> o; FFN: gate, up -> down, or fc1 -> fc2 for a plain FFN), the activation, the
config keys that hold the widths, and the module attributes the family's forward reads. It never
computes anything a layer computes: layers run through the model's own forward with the arguments
the model passes them (:mod:`daprune.models.layer_inputs`).

A new family is one small file: subclass :class:`BlockAdapter` (the six structure methods, plus
``to_canonical`` / ``to_native`` if its weights are fused or transposed, plus ``on_heads_changed`` if
its forward reads head counts from module attributes), subclass :class:`ModelAdapter` (``layers``,
``block``, ``model_types``, ``shape_keys``), decorate it with :func:`register` and add the module to
``FAMILY_MODULES``.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import nn

from daprune.errors import UnsupportedModelError
from daprune.models.layer_inputs import attention_implementation, layer_call

log = logging.getLogger(__name__)

# config key: names (inside a block) of the linears that carry biases the family's config cannot express
EXTRA_BIASES_KEY = "daprune_extra_biases"
# config key: per-block shapes of a model whose blocks differ (read by the remote code and daprune.load)
LAYERS_KEY = "daprune_layers"
# config key: dotted path of the decoder layers' ModuleList (the remote code needs it for every family)
LAYERS_PATH_KEY = "daprune_layers_path"
# modules that register a family adapter (imported on first use)
FAMILY_MODULES = ("daprune.models.llama", "daprune.models.phi3", "daprune.models.opt", "daprune.models.gpt2",
                  "daprune.models.gpt_neox", "daprune.models.moe")


def _zero_bias(lin: nn.Linear) -> None:
    """Give ``lin`` a zero bias (same dtype and device as its weight) if it has none."""
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device),
                                requires_grad=lin.weight.requires_grad)


def slice_linear(linear: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim=0: outputs, with their bias) or columns (dim=1: inputs) of a Linear, in place."""
    idx = idx.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.data.index_select(dim, idx).contiguous(),
                                 requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.data.index_select(0, idx).contiguous(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = linear.weight.shape[0]
    else:
        linear.in_features = linear.weight.shape[1]


class BlockAdapter(ABC):
    """One decoder block seen as two depth-2 modules: attention (q,k,v -> o) and FFN (gate,up -> down)."""

    def __init__(self, layer: nn.Module, index: int):
        self.layer = layer
        self.index = index

    # -- structure (in canonical form: plain nn.Linear, weight [out, in]) ----------------------------------
    @abstractmethod
    def attn_in(self) -> list[nn.Linear]:
        """Level-1 attention linears [q, k, v]."""

    @abstractmethod
    def attn_out(self) -> nn.Linear:
        """Level-2 attention linear (o)."""

    @abstractmethod
    def ffn_in(self) -> list[nn.Linear]:
        """Level-1 FFN linears: [gate, up] for a gated FFN (gate first), [fc1] for a plain one."""

    @abstractmethod
    def ffn_out(self) -> nn.Linear:
        """Level-2 FFN linear (down / fc2)."""

    @abstractmethod
    def ffn_act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The FFN activation (SiLU for SwiGLU, GELU for GeGLU and most plain FFNs)."""

    @abstractmethod
    def attention_module(self) -> nn.Module:
        """The module whose forward returns ``(attn_output, attn_weights)``."""

    def ffn_module(self) -> nn.Module:
        """The FFN as one module (input: its normed input; output: its contribution), for tests and FLAP."""
        raise NotImplementedError(f"{type(self).__name__} does not expose its FFN as one module")

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

    @property
    def gated(self) -> bool:
        return len(self.ffn_in()) == 2

    @property
    def n_heads(self) -> int:
        return self.attn_in()[0].out_features // self.head_dim

    @property
    def n_kv_heads(self) -> int:
        return self.attn_in()[1].out_features // self.head_dim

    @property
    def group_size(self) -> int:
        return self.n_heads // self.n_kv_heads

    @property
    def n_channels(self) -> int:
        return self.ffn_out().in_features

    def head_groups(self) -> list[list[int]]:
        """Query heads that share each KV head (HF's repeat_kv layout: head h uses KV head h // g)."""
        g = self.group_size
        return [list(range(k * g, (k + 1) * g)) for k in range(self.n_kv_heads)]

    # -- fused / transposed weights -------------------------------------------------------------------
    def to_canonical(self) -> None:
        """Present fused or transposed weights as plain Linears (the model's forward must still run)."""
        return None

    def to_native(self) -> None:
        """Undo :meth:`to_canonical`, so saved tensors keep the family's own names and layouts."""
        return None

    # -- computation ----------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, ctx: dict, probs: list[torch.Tensor] | None = None) -> torch.Tensor:
        """Run the whole block with the arguments the model gave it (``ctx``).

        With ``probs`` (a list), attention runs in the family's eager implementation and its attention
        probabilities ``[batch, heads, q, k]`` (masking, soft-capping, sliding windows: all the model's own)
        are appended to it, for the head-similarity criterion.
        """
        if probs is None:
            return layer_call(self.layer, hidden, ctx)
        attn = self.attention_module()

        def grab(_m, _args, out):
            probs.append(out[1].detach().float())

        handle = attn.register_forward_hook(grab)
        try:
            with attention_implementation(attn.config, "eager"):
                return layer_call(self.layer, hidden, ctx)
        finally:
            handle.remove()

    def ffn_output_scale(self) -> float | None:
        """``c`` where the block's output is (everything else) + c * (level-2 FFN linear's output), or None where
        that output reaches the block's output through something nonlinear (a norm) or the family does not say.

        Lets the pipeline form a pruned block's output from its last statistics pass (:meth:`ffn_output_delta`),
        and is the exact gain a re-fit aimed at the dense *block* output divides by (:meth:`ffn_output_gain`).
        """
        return None

    def ffn_output_gain(self, o: torch.Tensor) -> torch.Tensor | float | None:
        """How much the block's output moves per unit move of the level-2 FFN linear's output ``o``, elementwise
        (the Jacobian's diagonal part; ``--recovery-target block`` divides the block output's shortfall by it,
        damped where it is a norm's: :func:`daprune.recovery.block_target_step`).
        Exact where the output is added as it is (:meth:`ffn_output_scale`); a family with a norm after the FFN
        gives the norm's gain at ``o``. None: the family does not say."""
        return self.ffn_output_scale()

    def ffn_output_gain_known(self) -> bool:
        """Whether :meth:`ffn_output_gain` has an answer; reads no weight (asked before a streamed model has any)."""
        return self.ffn_output_scale() is not None

    def ffn_output_delta(self, o_old: torch.Tensor, o_new: torch.Tensor) -> torch.Tensor | None:
        """How the block's output changes when its level-2 FFN linear's output goes from ``o_old`` to ``o_new``.

        Lets the pipeline form a pruned block's output from its last statistics pass (daprune.replay)
        instead of running the block again. None: this family does not say, the block is re-run.
        """
        scale = self.ffn_output_scale()
        return None if scale is None else (o_new - o_old) * scale

    # -- surgery ----------------------------------------------------------------------------------------
    def slice_heads(self, keep: Sequence[int]) -> None:
        """Keep these query heads and the KV heads they use.

        Every kept KV group must keep the same number of query heads (so the block stays an ordinary GQA
        block); a KV group none of whose heads is kept is removed whole (multi-head attention: a head).
        """
        keep = sorted(int(h) for h in keep)
        g = self.group_size
        kv_keep = sorted({h // g for h in keep})
        counts = {kv: sum(1 for h in keep if h // g == kv) for kv in kv_keep}
        if not keep or len(set(counts.values())) != 1:
            raise ValueError(f"block {self.index}: GQA groups would become unequal: {counts}")
        hd = self.head_dim
        q_idx = torch.tensor([h * hd + d for h in keep for d in range(hd)])
        kv_idx = torch.tensor([kv * hd + d for kv in kv_keep for d in range(hd)])
        q, k, v = self.attn_in()
        slice_linear(q, q_idx, 0)
        slice_linear(k, kv_idx, 0)
        slice_linear(v, kv_idx, 0)
        slice_linear(self.attn_out(), q_idx, 1)
        self.on_heads_changed(len(keep), len(kv_keep))

    def slice_ffn(self, keep: Sequence[int]) -> None:
        """Keep these FFN channels (rows of the level-1 linears, columns of the level-2 one)."""
        idx = torch.as_tensor(sorted(int(c) for c in keep), dtype=torch.long)
        for lin in self.ffn_in():
            slice_linear(lin, idx, 0)
        slice_linear(self.ffn_out(), idx, 1)
        self.on_ffn_changed(len(idx))

    def on_heads_changed(self, n_heads: int, n_kv_heads: int) -> None:
        """Update module attributes the family's forward reads (head counts, split sizes)."""
        self.apply_layout()

    def on_ffn_changed(self, n_channels: int) -> None:
        """Update module attributes that hold the FFN width."""
        self.apply_layout()

    def apply_layout(self) -> None:
        """Set every :meth:`layout_attributes` entry on the block (the remote code's own setter)."""
        for name, value in self.layout_attributes().items():
            _set_dotted(self.layer, name, value)

    def layout_attributes(self) -> dict[str, int]:
        """Module attributes (dotted, inside the block) that must follow the block's current shapes.

        Recorded per block in the config, so the remote code and ``daprune.load`` set them after resizing.
        """
        return {}

    def add_output_bias(self, kind: str, bias: torch.Tensor) -> None:
        """Add ``bias`` to the output of o_proj (``kind`` "attention") or down_proj ("mlp"), creating it if absent.

        FLAP's bias compensation needs it. Only the level-2 linear of this block changes here; the config
        flag (or ``config.daprune_extra_biases``) and the zero biases of the other linears or blocks follow
        model-wide in ModelAdapter.sync_biases, after pruning, so the per-block parameter accounting during
        pruning is not disturbed.
        """
        lin = {"attention": self.attn_out, "mlp": self.ffn_out}[kind]()
        add = bias.detach().to(device=lin.weight.device, dtype=lin.weight.dtype)
        if lin.bias is None:
            lin.bias = nn.Parameter(add.clone(), requires_grad=lin.weight.requires_grad)
        else:
            lin.bias.data += add

    def module_name(self, module: nn.Module) -> str:
        """Dotted name of ``module`` inside this block, e.g. "mlp.down_proj"."""
        for name, mod in self.layer.named_modules():
            if mod is module:
                return name
        raise ValueError(f"block {self.index} has no such module")

    def ensure_bias(self, name: str) -> None:
        """Give the linear ``name`` (dotted, inside this block) a zero bias if it has none."""
        _zero_bias(self.layer.get_submodule(name))

    def shape(self) -> dict[str, int]:
        return {
            "num_attention_heads": self.n_heads,
            "num_key_value_heads": self.n_kv_heads,
            "intermediate_size": self.n_channels,
        }

    def record(self) -> dict:
        """Everything needed to rebuild this block's shapes from a dense skeleton.

        Widths and layout attributes are read in canonical form, module shapes in native form (the form
        the remote code and ``daprune.load`` resize); the block is left in native form.
        """
        self.to_canonical()
        shape, attrs = self.shape(), self.layout_attributes()
        self.to_native()
        modules = {name: list(mod.weight.shape) for name, mod in self.layer.named_modules()
                   if name and type(mod).__name__ in ("Linear", "Conv1D") and hasattr(mod, "weight")}
        tensors = self.tensor_shapes()
        return {**shape, "modules": modules, **({"tensors": tensors} if tensors else {}),
                **({"attributes": attrs} if attrs else {})}

    def tensor_shapes(self) -> dict[str, list[int]]:
        """Shapes of parameters that pruning changes outside any Linear (fused 3-D expert weights)."""
        return {}

    def level2(self, kind: str) -> nn.Linear | None:
        """The level-2 linear of ``kind`` ("attention": o_proj, "mlp": down_proj), None where there is no single one."""
        return self.attn_out() if kind == "attention" else self.ffn_out()


def _set_dotted(root: nn.Module, name: str, value) -> None:
    """The remote code's own setter: a path through ``config`` gives that module its own config copy."""
    from daprune.io_templates.modeling_daprune import set_path

    set_path(root, name, value)


class ModelAdapter(ABC):
    """Whole-model access: the decoder layers, block adapters, config updates."""

    model_types: tuple[str, ...] = ()
    # config keys of the widths that pruning changes; kv_heads None: a multi-head-only family
    shape_keys: dict[str, str | None] = {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads",
                                         "channels": "intermediate_size"}
    # config key of the head size; None: the family derives it (hidden size / heads), so fewer heads
    # cannot be expressed in its plain config and need per-layer records
    head_dim_key: str | None = "head_dim"

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @abstractmethod
    def layers(self) -> nn.ModuleList: ...

    @abstractmethod
    def block(self, index: int, layer: nn.Module | None = None) -> BlockAdapter:
        """Adapter for block ``index`` (or for ``layer``, e.g. a copy of it)."""

    @property
    def n_layers(self) -> int:
        return len(self.layers())

    def final_norm(self) -> nn.Module | None:
        """The norm between the last decoder layer and the LM head (``model.norm`` in most families)."""
        return self.model.model.norm

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits from the last decoder layer's output, as the model's own forward computes them.

        Final norm, LM head, then the config's logit scaling (Granite) and soft-capping (Gemma-2/3). The
        sensitivity schedule reads the model's output distribution from a stream it propagated itself.
        """
        return self.finish_logits(self.raw_logits(hidden))

    def raw_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """The LM head's output on the final norm's: the logits before the config's own transforms."""
        norm = self.final_norm()
        return self.model.get_output_embeddings()(norm(hidden) if norm is not None else hidden)

    def finish_logits(self, z: torch.Tensor) -> torch.Tensor:
        """The config's transforms of the LM head's output: logit scaling (Granite), then soft-capping (Gemma)."""
        scale = getattr(self.config, "logits_scaling", None)
        if scale:
            z = z / scale
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap:
            z = torch.tanh(z / cap) * cap
        return z

    def layers_path(self) -> str:
        target = self.layers()
        for name, mod in self.model.named_modules():
            if mod is target:
                return name
        raise ValueError("the decoder layers are not part of the model")  # pragma: no cover

    def bias_flag(self, kind: str) -> str | None:
        """Config flag that gives all ``kind`` ("attention"/"mlp") linears a bias, or None if the family has none."""
        return None

    def native_biases(self, kind: str) -> bool:
        """Whether every block's ``kind`` level-2 linear always has a bias in this family (GPT-2, NeoX's MLP).

        Such biases need neither a config flag nor a ``daprune_extra_biases`` entry.
        """
        return False

    def ensure_biases(self, kind: str) -> bool:
        """Make ``kind``'s biases model-wide: zeros where missing in every block, and the config flag set.

        A vanilla ``from_pretrained`` builds biases for all blocks or none, so a bias added to some blocks
        (FLAP compensation) only round-trips if every block has one. Returns False (changing nothing) when
        the family's config cannot express it; such a model then keeps its biases only in memory.
        """
        flag = self.bias_flag(kind)
        if flag is None:
            return False
        for i in range(self.n_layers):
            block = self.block(i)
            if kind == "attention":
                linears = block.attn_in() + [block.attn_out()]
            else:
                linears = block.ffn_in() + [block.ffn_out()]
            for lin in linears:
                _zero_bias(lin)
        setattr(self.config, flag, True)
        return True

    def sync_biases(self) -> list[str]:
        """Kinds whose level-2 linear has a bias in some block; each is made model-wide.

        With a config flag (``ensure_biases``) vanilla transformers rebuilds the biases. Without one
        (Mistral, Qwen2, Qwen3's MLP) only the level-2 linear of every block gets a bias (zeros where it had
        none) and its name inside the block ("self_attn.o_proj", "mlp.down_proj") is recorded in
        ``config.daprune_extra_biases``: vanilla transformers cannot build such biases for these families, so
        ``daprune.load`` and the remote code (which ``output.write_remote_code`` then ships even for uniform
        shapes) rebuild them from that list.
        """
        kinds: list[str] = []
        extra: set[str] = set()
        blocks = [self.block(i) for i in range(self.n_layers)]
        for kind in ("attention", "mlp"):
            level2 = [(b, lin) for b in blocks if (lin := b.level2(kind)) is not None]
            if not any(lin.bias is not None for _, lin in level2) or self.native_biases(kind):
                continue
            kinds.append(kind)
            if self.ensure_biases(kind):
                continue
            for block, lin in level2:
                _zero_bias(lin)
                extra.add(block.module_name(lin))
        if extra:
            setattr(self.config, EXTRA_BIASES_KEY, sorted(extra))
        elif hasattr(self.config, EXTRA_BIASES_KEY):
            delattr(self.config, EXTRA_BIASES_KEY)
        return kinds

    def expressible(self, shape: dict[str, int]) -> bool:
        """Whether the family's plain config can state these (uniform) widths."""
        keys = self.shape_keys
        if keys["kv_heads"] is None and shape["num_key_value_heads"] != shape["num_attention_heads"]:
            return False
        if self.head_dim_key is None:
            return shape["num_attention_heads"] == getattr(self.config, keys["heads"])
        return True

    def update_config(self) -> dict:
        """Write the blocks' current shapes into the config; return the per-layer shapes.

        Uniform widths the family's config can state go into its own keys (vanilla transformers loads the
        folder); otherwise ``daprune_layers`` records every block's module shapes and layout attributes.
        """
        blocks = [self.block(i) for i in range(self.n_layers)]
        for b in blocks:
            b.to_canonical()
        try:
            self.sync_biases()  # FLAP-compensated blocks got o/down biases: make them model-wide
            shapes = [b.shape() for b in blocks]
        finally:
            for b in blocks:
                b.to_native()
        cfg = self.config
        uniform = all(s == shapes[0] for s in shapes)
        if self.head_dim_key is not None:
            setattr(cfg, self.head_dim_key, blocks[0].head_dim)  # explicit: hidden/heads no longer gives it
        if uniform and self.expressible(shapes[0]):
            names = {"num_attention_heads": "heads", "num_key_value_heads": "kv_heads",
                     "intermediate_size": "channels", "moe_intermediate_size": "experts",
                     "shared_expert_intermediate_size": "shared"}
            for key, value in shapes[0].items():
                if self.shape_keys[names[key]] is not None:
                    setattr(cfg, self.shape_keys[names[key]], value)
            for key in (LAYERS_KEY, LAYERS_PATH_KEY):
                if hasattr(cfg, key):
                    delattr(cfg, key)
        else:
            setattr(cfg, LAYERS_KEY, [b.record() for b in blocks])
            setattr(cfg, LAYERS_PATH_KEY, self.layers_path())
        return {"layers": shapes, "uniform": uniform}


_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for t in cls.model_types:
        _REGISTRY[t] = cls
    return cls


def supported_model_types() -> list[str]:
    for name in FAMILY_MODULES:
        importlib.import_module(name)
    return sorted(_REGISTRY)


def family_of(config) -> str | None:
    """The family's model type of a config, also for daprune's per-layer types ("daprune_llama" -> "llama")."""
    from daprune.io_templates.modeling_daprune import base_model_type

    return base_model_type(getattr(config, "model_type", None))


def get_adapter(model: nn.Module) -> ModelAdapter:
    supported = supported_model_types()
    model_type = family_of(model.config)
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; daprune supports: {', '.join(supported)}"
        )
    return _REGISTRY[model_type](model)
