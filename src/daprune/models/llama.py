"""Llama-family decoders: Llama, Mistral, Qwen2, Qwen3 (same block layout, SwiGLU FFN, RoPE, GQA).

Qwen2 adds q/k/v biases and Qwen3 per-head q/k RMSNorms; both are handled where they matter
(bias rows are sliced with their weights; the norms act on head_dim, which never changes).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv

from daprune.models.adapter import BlockAdapter, ModelAdapter, register


def _slice_linear(linear: nn.Linear, idx: torch.Tensor, dim: int) -> None:
    """Keep rows (dim=0: outputs) or columns (dim=1: inputs) of a Linear, in place."""
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


class LlamaBlock(BlockAdapter):
    def attention_module(self) -> nn.Module:
        return self.layer.self_attn

    def ffn_module(self) -> nn.Module:
        return self.layer.mlp

    def attn_in(self) -> list[nn.Linear]:
        a = self.layer.self_attn
        return [a.q_proj, a.k_proj, a.v_proj]

    def attn_out(self) -> nn.Linear:
        return self.layer.self_attn.o_proj

    def ffn_in(self) -> list[nn.Linear]:
        return [self.layer.mlp.gate_proj, self.layer.mlp.up_proj]

    def ffn_out(self) -> nn.Linear:
        return self.layer.mlp.down_proj

    def ffn_act(self) -> Callable[[torch.Tensor], torch.Tensor]:
        return self.layer.mlp.act_fn

    def attn_norm(self) -> nn.Module:
        return self.layer.input_layernorm

    def ffn_norm(self) -> nn.Module:
        return self.layer.post_attention_layernorm

    @property
    def head_dim(self) -> int:
        return self.layer.self_attn.head_dim

    def attention_probs(self, normed: torch.Tensor, ctx: dict) -> torch.Tensor:
        attn = self.layer.self_attn
        b, s, _ = normed.shape
        shape = (b, s, -1, self.head_dim)
        q = attn.q_proj(normed).view(shape)
        k = attn.k_proj(normed).view(shape)
        if hasattr(attn, "q_norm"):  # Qwen3
            q, k = attn.q_norm(q), attn.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        cos, sin = ctx["position_embeddings"]
        q, k = apply_rotary_pos_emb(q, k, cos, sin)
        k = repeat_kv(k, self.group_size)
        scores = torch.matmul(q.float(), k.float().transpose(2, 3)) * attn.scaling
        mask = ctx["attention_mask"]
        if mask is not None:
            scores = scores + mask.float()
        return torch.softmax(scores, dim=-1)

    def slice_heads(self, keep: Sequence[int]) -> None:
        keep = sorted(int(h) for h in keep)
        g = self.group_size
        kv_keep = sorted({h // g for h in keep})
        counts = {kv: sum(1 for h in keep if h // g == kv) for kv in kv_keep}
        if len(set(counts.values())) != 1:
            raise ValueError(f"block {self.index}: GQA groups would become unequal: {counts}")
        hd = self.head_dim
        q_idx = torch.tensor([h * hd + d for h in keep for d in range(hd)])
        kv_idx = torch.tensor([kv * hd + d for kv in kv_keep for d in range(hd)])
        q, k, v = self.attn_in()
        _slice_linear(q, q_idx, 0)
        _slice_linear(k, kv_idx, 0)
        _slice_linear(v, kv_idx, 0)
        _slice_linear(self.attn_out(), q_idx, 1)
        self.layer.self_attn.num_key_value_groups = len(keep) // len(kv_keep)

    def slice_ffn(self, keep: Sequence[int]) -> None:
        idx = torch.as_tensor(sorted(int(c) for c in keep), dtype=torch.long)
        for lin in self.ffn_in():
            _slice_linear(lin, idx, 0)
        _slice_linear(self.ffn_out(), idx, 1)
        if hasattr(self.layer.mlp, "intermediate_size"):
            self.layer.mlp.intermediate_size = len(idx)


@register
class LlamaFamilyAdapter(ModelAdapter):
    model_types = ("llama", "mistral", "qwen2", "qwen3")

    def layers(self) -> nn.ModuleList:
        return self.model.model.layers

    def block(self, index: int, layer: nn.Module | None = None) -> LlamaBlock:
        return LlamaBlock(self.layers()[index] if layer is None else layer, index)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.model.embed_tokens(input_ids)

    def block_context(self, hidden: torch.Tensor) -> dict:
        b, s, _ = hidden.shape
        position_ids = torch.arange(s, device=hidden.device).unsqueeze(0)
        mask = torch.full((s, s), torch.finfo(hidden.dtype).min, dtype=hidden.dtype, device=hidden.device)
        mask = torch.triu(mask, diagonal=1)[None, None]
        pe = self.model.model.rotary_emb(hidden, position_ids=position_ids)
        return {"attention_mask": mask, "position_embeddings": pe, "position_ids": position_ids}

    # config flags that give every block's attention / MLP linears biases (Mistral and Qwen2 have none)
    _BIAS_FLAGS = {"llama": {"attention": "attention_bias", "mlp": "mlp_bias"},
                   "qwen3": {"attention": "attention_bias"}}

    def bias_flag(self, kind: str) -> str | None:
        return self._BIAS_FLAGS.get(getattr(self.config, "model_type", ""), {}).get(kind)

    def update_config(self) -> dict:
        # FLAP-compensated blocks got o/down biases: make them model-wide, set the flag or daprune_extra_biases
        self.sync_biases()
        shapes = [self.block(i).shape() for i in range(self.n_layers)]
        cfg = self.config
        cfg.head_dim = self.block(0).head_dim  # explicit: hidden/heads no longer gives it
        if all(s == shapes[0] for s in shapes):
            for key, value in shapes[0].items():
                setattr(cfg, key, value)
            if hasattr(cfg, "daprune_layers"):
                del cfg.daprune_layers
        else:
            cfg.daprune_layers = shapes
        return {"layers": shapes, "uniform": all(s == shapes[0] for s in shapes)}
