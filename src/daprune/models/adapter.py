"""The interface between the pruning algorithm and a model family.

Everything that knows module names lives behind :class:`ModelAdapter` and :class:`BlockAdapter`;
the pipeline, criteria and recovery only see linears, activations and index sets.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

import torch
from torch import nn

from daprune.errors import UnsupportedModelError

log = logging.getLogger(__name__)

# config key: names (inside a block) of the linears that carry biases the family's config cannot express
EXTRA_BIASES_KEY = "daprune_extra_biases"


def _zero_bias(lin: nn.Linear) -> None:
    """Give ``lin`` a zero bias (same dtype and device as its weight) if it has none."""
    if lin.bias is None:
        lin.bias = nn.Parameter(torch.zeros(lin.out_features, dtype=lin.weight.dtype, device=lin.weight.device),
                                requires_grad=lin.weight.requires_grad)


class BlockAdapter(ABC):
    """One decoder block seen as two depth-2 modules: attention (q,k,v -> o) and FFN (gate,up -> down)."""

    def __init__(self, layer: nn.Module, index: int):
        self.layer = layer
        self.index = index

    # -- structure ---------------------------------------------------------------------------------
    @abstractmethod
    def attn_in(self) -> list[nn.Linear]:
        """Level-1 attention linears [q, k, v]."""

    @abstractmethod
    def attn_out(self) -> nn.Linear:
        """Level-2 attention linear (o)."""

    @abstractmethod
    def ffn_in(self) -> list[nn.Linear]:
        """Level-1 FFN linears [gate, up] (gate first: the score needs to know which one is gated)."""

    @abstractmethod
    def ffn_out(self) -> nn.Linear:
        """Level-2 FFN linear (down)."""

    @abstractmethod
    def ffn_act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        """The gate activation (SiLU for SwiGLU)."""

    @abstractmethod
    def attn_norm(self) -> nn.Module: ...

    @abstractmethod
    def ffn_norm(self) -> nn.Module: ...

    @property
    @abstractmethod
    def head_dim(self) -> int: ...

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

    # -- computation ---------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Run the whole block; ``ctx`` holds what ModelAdapter.block_context returned."""
        out = self.layer(hidden, **ctx)
        return out[0] if isinstance(out, tuple) else out

    def attention(self, normed: torch.Tensor, ctx: dict) -> torch.Tensor:
        out = self.attention_module()(hidden_states=normed, attention_mask=ctx["attention_mask"],
                                      position_embeddings=ctx["position_embeddings"])
        return out[0] if isinstance(out, tuple) else out

    @abstractmethod
    def attention_module(self) -> nn.Module: ...

    @abstractmethod
    def ffn_module(self) -> nn.Module: ...

    @abstractmethod
    def attention_probs(self, normed: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Per-head attention probabilities [batch, heads, q, k] in fp32.

        Computed explicitly because sdpa ignores ``output_attentions``.
        """

    # -- surgery -------------------------------------------------------------------------------------
    @abstractmethod
    def slice_heads(self, keep: Sequence[int]) -> None:
        """Keep these query heads (and the KV heads they use); GQA groups must stay equal in size."""

    @abstractmethod
    def slice_ffn(self, keep: Sequence[int]) -> None:
        """Keep these FFN channels (rows of gate/up, columns of down)."""

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


class ModelAdapter(ABC):
    """Whole-model access: embeddings, blocks, per-block call context, config updates."""

    model_types: tuple[str, ...] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.config = model.config

    @abstractmethod
    def layers(self) -> nn.ModuleList: ...

    @abstractmethod
    def block(self, index: int, layer: nn.Module | None = None) -> BlockAdapter:
        """Adapter for block ``index`` (or for ``layer``, e.g. a copy of it)."""

    @abstractmethod
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def block_context(self, hidden: torch.Tensor) -> dict:
        """Keyword arguments every block forward needs (causal mask, rotary embeddings)."""

    @property
    def n_layers(self) -> int:
        return len(self.layers())

    def num_parameters(self) -> int:
        """Unique parameters: tied embeddings are counted once."""
        seen: set[int] = set()
        total = 0
        for p in self.model.parameters():
            if p.data_ptr() in seen:
                continue
            seen.add(p.data_ptr())
            total += p.numel()
        return total

    def bias_flag(self, kind: str) -> str | None:
        """Config flag that gives all ``kind`` ("attention"/"mlp") linears a bias, or None if the family has none."""
        return None

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
        ``daprune.load`` and the remote code (which ``io.write_remote_code`` then ships even for uniform
        shapes) rebuild them from that list.
        """
        kinds: list[str] = []
        extra: set[str] = set()
        blocks = [self.block(i) for i in range(self.n_layers)]
        for kind in ("attention", "mlp"):
            level2 = [(b, b.attn_out() if kind == "attention" else b.ffn_out()) for b in blocks]
            if not any(lin.bias is not None for _, lin in level2):
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

    @abstractmethod
    def update_config(self) -> dict:
        """Write the blocks' current shapes into the config; return the per-layer shapes."""


_REGISTRY: dict[str, type[ModelAdapter]] = {}


def register(cls: type[ModelAdapter]) -> type[ModelAdapter]:
    for t in cls.model_types:
        _REGISTRY[t] = cls
    return cls


def supported_model_types() -> list[str]:
    from daprune.models import llama  # noqa: F401  (registers the Llama family)

    return sorted(_REGISTRY)


def get_adapter(model: nn.Module) -> ModelAdapter:
    supported = supported_model_types()
    model_type = getattr(model.config, "model_type", None)
    if model_type not in _REGISTRY:
        raise UnsupportedModelError(
            f"unsupported architecture {model_type!r}; daprune supports: {', '.join(supported)}"
        )
    return _REGISTRY[model_type](model)
