"""Mixture-of-experts decoders: Mixtral, Qwen2-MoE, Qwen3-MoE.

Their attention is Llama-shaped (``self_attn.{q,k,v,o}_proj``), so heads are pruned exactly as for the
dense family. The FFN is a sparse MoE block ``mlp`` with a router ``mlp.gate`` (left untouched), routed
experts stored as fused 3-D parameters ``mlp.experts.gate_up_proj [E, 2I, H]`` and
``mlp.experts.down_proj [E, H, I]`` (transformers 5), and for Qwen2-MoE a shared expert
``mlp.shared_expert`` (a plain gated MLP whose output is scaled by ``sigmoid(mlp.shared_expert_gate(x))``).

Each expert is a depth-2 unit of its own: :class:`ExpertFFN` presents expert ``e`` as a gated FFN (gate,
up -> down) on *views* of the fused parameters, so every FFN criterion and the greedy / OBS selection
apply to it unchanged. Its statistics are those of the expert's real contribution to the block output,
``w_t * act(gate x_t) * up x_t`` for the tokens the router sends it (``w_t`` the routing weight), zero for
the others (:func:`expert_moments`). All experts of a layer keep the same number of channels (which ones
differ per expert), so the config still states the layer with one ``moe_intermediate_size``.

Layers that are dense in these models (Qwen2-MoE's ``mlp_only_layers``) get the ordinary Llama block.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from daprune.models.adapter import family_of, register, slice_linear
from daprune.models.layer_inputs import layer_call
from daprune.models.llama import LlamaBlock, LlamaFamilyAdapter
from daprune.stats import Moments


def _linear_view(weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` whose weight *is* ``weight`` (a view: writes reach the fused parameter)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    lin.weight = nn.Parameter(weight, requires_grad=False)
    return lin


class FFNUnit:
    """The FFN part of the block interface, for one of an MoE block's FFNs (what criteria read)."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act: Callable, index: int, name: str):
        self._in, self._out, self._act = [gate, up], down, act
        self.index, self.name = index, name
        self.tokens = 0  # calibration tokens that reached this FFN (routed, for an expert)

    def ffn_in(self) -> list[nn.Linear]:
        return self._in

    def ffn_out(self) -> nn.Linear:
        return self._out

    def ffn_act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self._act

    @property
    def gated(self) -> bool:
        return True

    @property
    def n_channels(self) -> int:
        return self._out.in_features


class MoEBlock(LlamaBlock):
    """A Llama-shaped attention block whose FFN is a sparse mixture of experts."""

    is_moe = True
    # kept expert widths are multiples of this: 16-byte aligned rows in bf16, which transformers' default
    # grouped-matmul expert kernel requires (schedule.width_multiple)
    width_alignment = 8

    def ffn_output_scale(self) -> float | None:
        return None  # the experts are pruned one by one (daprune.experts); no single level-2 linear

    @property
    def moe(self) -> nn.Module:
        return self.layer.mlp

    @property
    def experts(self) -> nn.Module:
        return self.layer.mlp.experts

    @property
    def n_experts(self) -> int:
        return self.experts.down_proj.shape[0]

    @property
    def shared(self) -> nn.Module | None:
        return getattr(self.layer.mlp, "shared_expert", None)

    @property
    def n_channels(self) -> int:
        """Channels of each routed expert (all equal within a layer)."""
        return self.experts.down_proj.shape[2]

    @property
    def n_shared(self) -> int:
        return 0 if self.shared is None else self.shared.down_proj.in_features

    @property
    def gated(self) -> bool:
        return True

    def ffn_in(self) -> list[nn.Linear]:
        raise TypeError(f"block {self.index} is a mixture of experts: its FFNs are ffn_units()")

    def ffn_out(self) -> nn.Linear:
        raise TypeError(f"block {self.index} is a mixture of experts: its FFNs are ffn_units()")

    def ffn_act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.experts.act_fn

    def expert(self, e: int) -> FFNUnit:
        """Routed expert ``e`` as a gated FFN on views of the fused parameters."""
        n = self.n_channels
        gate_up, down = self.experts.gate_up_proj.data[e], self.experts.down_proj.data[e]
        return FFNUnit(_linear_view(gate_up[:n]), _linear_view(gate_up[n:]), _linear_view(down),
                       self.experts.act_fn, self.index, f"expert {e}")

    def shared_unit(self) -> FFNUnit | None:
        s = self.shared
        if s is None:
            return None
        return FFNUnit(s.gate_proj, s.up_proj, s.down_proj, s.act_fn, self.index, "shared expert")

    def ffn_units(self) -> list[FFNUnit]:
        """Every FFN of the block: the routed experts in order, then the shared expert if any."""
        units = [self.expert(e) for e in range(self.n_experts)]
        shared = self.shared_unit()
        return units + ([shared] if shared is not None else [])

    def shared_removed(self, channels: int) -> int:
        """Shared-expert channels removed with ``channels`` of every routed expert: the same fraction."""
        return round(channels * self.n_shared / self.n_channels) if self.n_shared else 0

    def channel_params(self) -> float:
        """Parameters freed by one channel of every routed expert (plus the shared expert's share)."""
        hidden = self.experts.down_proj.shape[1]
        per = 3 * hidden  # a gate row, an up row and a down column
        return self.n_experts * per + (per * self.n_shared / self.n_channels if self.n_shared else 0.0)

    def slice_experts(self, keep: Sequence[Sequence[int]], shared_keep: Sequence[int] | None = None) -> None:
        """Keep ``keep[e]`` channels of routed expert ``e`` (equal counts) and ``shared_keep`` of the shared one."""
        if len(keep) != self.n_experts:
            raise ValueError(f"block {self.index}: {len(keep)} keep lists for {self.n_experts} experts")
        if len({len(k) for k in keep}) != 1 or not keep[0]:
            raise ValueError(f"block {self.index}: every expert must keep the same (non-zero) number of channels")
        n = self.n_channels
        idx = torch.tensor([sorted(int(c) for c in k) for k in keep], dtype=torch.long)  # [E, k]
        ex = self.experts
        gate_up = ex.gate_up_proj.data
        rows = torch.cat([idx, idx + n], 1).to(gate_up.device)  # gate rows then up rows, per expert
        new_gu = torch.gather(gate_up, 1, rows[:, :, None].expand(-1, -1, gate_up.shape[2]))
        down = ex.down_proj.data
        new_down = torch.gather(down, 2, idx.to(down.device)[:, None, :].expand(-1, down.shape[1], -1))
        ex.gate_up_proj = nn.Parameter(new_gu.contiguous(), requires_grad=ex.gate_up_proj.requires_grad)
        ex.down_proj = nn.Parameter(new_down.contiguous(), requires_grad=ex.down_proj.requires_grad)
        if shared_keep is not None and self.shared is not None:
            s = self.shared
            sidx = torch.as_tensor(sorted(int(c) for c in shared_keep), dtype=torch.long)
            slice_linear(s.gate_proj, sidx, 0)
            slice_linear(s.up_proj, sidx, 0)
            slice_linear(s.down_proj, sidx, 1)
        self.apply_layout()

    def shape(self) -> dict[str, int]:
        out = {"num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads,
               "moe_intermediate_size": self.n_channels}
        if self.shared is not None:
            out["shared_expert_intermediate_size"] = self.n_shared
        return out

    def layout_attributes(self) -> dict[str, int]:
        attrs = {"self_attn.num_key_value_groups": self.group_size, "mlp.experts.intermediate_dim": self.n_channels}
        if self.shared is not None and hasattr(self.shared, "intermediate_size"):
            attrs["mlp.shared_expert.intermediate_size"] = self.n_shared
        return attrs

    def level2(self, kind: str) -> nn.Linear | None:
        return self.attn_out() if kind == "attention" else None  # experts have no biases to compensate

    def tensor_shapes(self) -> dict[str, list[int]]:
        return {"mlp.experts.gate_up_proj": list(self.experts.gate_up_proj.shape),
                "mlp.experts.down_proj": list(self.experts.down_proj.shape)}

    def routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The router's choice for rows ``x`` [T, H]: (weights [T, k], expert indices [T, k]), as the model
        computes them (its own router module)."""
        _, weights, index = self.moe.gate(x)
        return weights, index


def expert_moments(block: MoEBlock, x: torch.Tensor, ctx: dict, batch_size: int, full_cov: bool = False,
                   all_tokens: bool = False) -> tuple[list[Moments], Moments | None]:
    """Routing-weighted moments of every expert's down-projection input over all tokens of ``x``.

    Expert ``e``'s row for token t is ``w_te * act(gate_e x_t) * (up_e x_t)`` when the router sends t to e
    with weight ``w_te``, and zero otherwise: the expert's exact contribution to the block output is
    ``down_e`` times that row, so ``down_e S_e down_e^T`` (S_e = E[row row^T]) is its output energy per
    token and the greedy / OBS errors keep their meaning (and units) across experts. The shared expert's
    rows are scaled by its sigmoid gate the same way. ``Moments.n`` counts all tokens; each returned
    expert's ``routed`` attribute counts the tokens routed to it.

    ``all_tokens``: instead, every expert's unweighted rows for *every* token reaching the layer (as if
    the router sent them all: the ``uniform`` choice for experts the calibration never reaches).
    """
    moe = block.moe
    E, n = block.n_experts, block.n_channels
    routed = [Moments(f"block {block.index} expert {e} down_in", full_cov=full_cov) for e in range(E)]
    counts = [0] * E
    shared = None if block.shared is None or all_tokens else Moments(f"block {block.index} shared expert down_in",
                                                                     full_cov=full_cov)
    total = 0

    def hook(_m, args):
        nonlocal total
        h = args[0].detach()
        h = h.reshape(-1, h.shape[-1])
        total += h.shape[0]
        act = block.experts.act_fn
        if all_tokens:
            for e in range(E):
                gu = h @ block.experts.gate_up_proj[e].T
                routed[e].update(act(gu[:, :n]) * gu[:, n:])
                counts[e] += h.shape[0]
            return
        weights, index = block.routing(h)
        for e in range(E):
            tok, pos = torch.where(index == e)
            if tok.numel() == 0:
                continue
            gu = h[tok] @ block.experts.gate_up_proj[e].T
            rows = act(gu[:, :n]) * gu[:, n:] * weights[tok, pos, None].to(gu.dtype)
            routed[e].update(rows)
            counts[e] += tok.numel()
        if shared is not None:
            s = block.shared
            rows = s.act_fn(s.gate_proj(h)) * s.up_proj(h) * torch.sigmoid(moe.shared_expert_gate(h))
            shared.update(rows)

    handle = moe.register_forward_pre_hook(hook)
    try:
        for s in range(0, x.shape[0], batch_size):
            layer_call(block.layer, x[s : s + batch_size], ctx)
    finally:
        handle.remove()
    for e in range(E):
        if counts[e]:
            routed[e].add_zeros(total - counts[e])
        routed[e].routed = counts[e]
    return routed, shared


@register
class MoEAdapter(LlamaFamilyAdapter):
    model_types = ("mixtral", "qwen2_moe", "qwen3_moe")

    def block(self, index: int, layer: nn.Module | None = None) -> LlamaBlock:
        layer = self.layers()[index] if layer is None else layer
        cls = MoEBlock if hasattr(layer.mlp, "experts") else LlamaBlock
        return cls(layer, index)

    @property
    def shape_keys(self) -> dict[str, str | None]:  # type: ignore[override]
        mixtral = family_of(self.config) == "mixtral"
        return {"heads": "num_attention_heads", "kv_heads": "num_key_value_heads", "channels": "intermediate_size",
                "experts": "intermediate_size" if mixtral else "moe_intermediate_size",
                "shared": "shared_expert_intermediate_size"}

    def bias_flag(self, kind: str) -> str | None:
        return None
