"""Which llama.cpp architecture a pruned folder becomes, and the metadata that describes its shapes.

Uniform blocks keep their family's own GGUF architecture. Blocks with different head counts or FFN widths
need a graph that reads per-layer arrays; llama.cpp has one for Llama-shaped blocks: ``deci``
(src/models/deci.cpp reads ``hparams.n_head(il)``, ``n_head_kv(il)`` and ``n_ff(il)`` for every layer).
Families without such a graph are refused with a pointer to the uniform layout.

Shapes are read from the weights themselves (q_proj rows / head_dim, k_proj rows / head_dim, gate_proj
rows), not from ``config.daprune_layers``, so the GGUF always describes the tensors it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from daprune.errors import DapruneError

# model_type -> (uniform GGUF architecture, per-layer GGUF architecture or None)
FAMILIES: dict[str, tuple[str, str | None]] = {
    "llama": ("llama", "deci"),
    "mistral": ("llama", "deci"),
}
# llama.cpp applies rotary embeddings to adjacent pairs (Meta layout) for these; HF stores q/k for rotate-half
NORM_ROPE = ("llama", "deci")


@dataclass(frozen=True)
class LayerShape:
    """What llama.cpp needs to know about one block."""

    n_head: int
    n_head_kv: int
    n_ff: int


class ExportError(DapruneError):
    """A folder that cannot be written as a GGUF llama.cpp runs."""


def layer_shapes(tensor_shapes: dict[str, tuple[int, ...]], n_layers: int, head_dim: int) -> list[LayerShape]:
    """Per-block head counts and FFN width from the weight shapes (``model.layers.{i}.*``)."""
    shapes = []
    for i in range(n_layers):
        p = f"model.layers.{i}."

        def rows(name: str, p=p) -> int:
            shape = tensor_shapes.get(p + name)
            return 0 if shape is None else int(shape[0])

        q, k, ff = rows("self_attn.q_proj.weight"), rows("self_attn.k_proj.weight"), rows("mlp.gate_proj.weight")
        if q % head_dim or k % head_dim:
            raise ExportError(f"block {i}: q/k rows ({q}, {k}) are not multiples of head_dim {head_dim}")
        shapes.append(LayerShape(q // head_dim, k // head_dim, ff))
    return shapes


def choose_arch(model_type: str, shapes: list[LayerShape]) -> str:
    """The GGUF architecture for this family and these shapes, or a one-line reason why there is none."""
    if model_type not in FAMILIES:
        raise ExportError(f"no GGUF export for model type {model_type!r}; supported: {', '.join(FAMILIES)}")
    uniform, per_layer = FAMILIES[model_type]
    if len(set(shapes)) <= 1:
        return uniform
    if per_layer is None:
        raise ExportError(f"llama.cpp has no per-layer graph for {model_type!r}; prune with --layout uniform "
                          "(same heads and FFN width in every block) to export it")
    return per_layer


def rope_theta(config: dict) -> float:
    """``rope_theta`` from a transformers 4 (top level) or 5 (``rope_parameters``) config."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def check_rope(config: dict) -> None:
    """Only plain RoPE is written; scaled variants (llama3, yarn, ...) need tensors or keys not handled here."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = params.get("rope_type", params.get("type", "default"))
    if kind not in ("default", None):
        raise ExportError(f"RoPE scaling {kind!r} is not supported by the GGUF export (only plain RoPE)")


def hparams(config: dict, shapes: list[LayerShape], head_dim: int, arch: str) -> dict[str, object]:
    """``GGUFWriter.add_<name>`` -> value; lists become the per-layer arrays the deci graph reads."""
    per_layer = arch == "deci"

    def field(values: list[int]) -> int | list[int]:
        return list(values) if per_layer else int(values[0])

    return {
        "context_length": int(config.get("max_position_embeddings", 2048)),
        "embedding_length": int(config["hidden_size"]),
        "block_count": len(shapes),
        "feed_forward_length": field([s.n_ff for s in shapes]),
        "head_count": field([s.n_head for s in shapes]),
        "head_count_kv": field([s.n_head_kv for s in shapes]),
        # head_dim need not be hidden / heads once heads are pruned: say it, llama.cpp would derive it wrongly
        "key_length": head_dim,
        "value_length": head_dim,
        "rope_dimension_count": head_dim,
        "rope_freq_base": rope_theta(config),
        "layer_norm_rms_eps": float(config.get("rms_norm_eps", 1e-6)),
        "vocab_size": int(config["vocab_size"]),
    }


def to_gguf_rotary(w: np.ndarray, n_head: int) -> np.ndarray:
    """HF q/k rows (rotate-half within each head) -> llama.cpp's layout (rotated pairs adjacent).

    Inverse of transformers' GGUF loader (``reverse_permute``: ``reshape(n, d/2, 2).swapaxes``): within head
    h, HF row ``h*d + j`` (j < d/2) becomes row ``h*d + 2j`` and HF row ``h*d + d/2 + j`` becomes ``h*d + 2j + 1``.
    Works for weights ``[rows, in]`` and biases ``[rows]``.
    """
    if n_head == 0:
        return w
    rows = w.shape[0]
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
