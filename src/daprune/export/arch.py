"""Which llama.cpp architecture a pruned folder becomes, and the metadata that describes its shapes.

Uniform blocks keep their family's own GGUF architecture (Llama/Mistral -> ``llama``, Qwen2 -> ``qwen2``,
Qwen3 -> ``qwen3``, Gemma-3 -> ``gemma3``). Blocks with different head counts or FFN widths need a graph
that reads per-layer arrays; llama.cpp has one for Llama-shaped blocks only: ``deci`` (src/models/deci.cpp
reads ``hparams.n_head(il)``, ``n_head_kv(il)`` and ``n_ff(il)`` for every layer). Qwen2 is Llama with q/k/v
biases, so it goes there too, and to ``llama`` where its own graph cannot hold uniform blocks (pruned heads,
compensation biases). Qwen3 and Gemma-3 (q/k norms, post-norms) are refused with a pointer to ``--layout
uniform``.

What differs per family is stated in :data:`FAMILIES` and :data:`META_ROPE`: whether the graph wants q/k rows in
Meta's interleaved rotary layout (llama, deci; the NeoX-style graphs take HF's rotate-half rows as they are), and
whether RMSNorm weights are shifted (Gemma computes ``x * (1 + w)``, llama.cpp ``x * w``, so the
converter writes ``1 + w``, as llama.cpp's own converter does).

Shapes are read from the weights themselves (q_proj rows / head_dim, k_proj rows / head_dim, gate_proj
rows), not from ``config.daprune_layers``, so the GGUF always describes the tensors it holds.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from daprune.errors import DapruneError

# The tensor types the writer offers (its OUTTYPES maps each to gguf's enums); named here, where no gguf or
# torch import is needed, so that the CLI's choices come from the same list.
OUTTYPE_NAMES = ("f32", "f16", "bf16", "q8_0")


@dataclass(frozen=True)
class ArchSpec:
    """How one transformers family maps onto llama.cpp."""

    uniform: str  # GGUF architecture of a model whose blocks all have the same widths
    per_layer: str | None  # GGUF architecture with per-layer widths, None where llama.cpp has no such graph
    norm_shift: float = 0.0  # added to every RMSNorm weight
    # for uniform blocks the family's own graph cannot hold (see :func:`own_graph_holds`): a graph that computes the
    # family exactly all the same (Qwen2 is Llama with q/k/v biases, so llama's graph, rows in Meta's rotary layout)
    general: str | None = None


FAMILIES: dict[str, ArchSpec] = {
    "llama": ArchSpec("llama", "deci"),
    "mistral": ArchSpec("llama", "deci"),
    "qwen2": ArchSpec("qwen2", "deci", general="llama"),
    "qwen3": ArchSpec("qwen3", None),
    "gemma3_text": ArchSpec("gemma3", None, norm_shift=1.0),
}

# graphs that rotate adjacent pairs (Meta's layout): q/k rows and biases are permuted from HF's rotate-half layout;
# the NeoX-style graphs (qwen2, qwen3, gemma3) take HF's rows as they are
META_ROPE = frozenset({"llama", "deci"})


# The bias tensors each llama.cpp graph creates when loading (src/models/<arch>.cpp, ``load_arch_tensors``, as
# vendored by llama-cpp-python 0.3.36): q/k/v biases in every graph (``create_tensor_qkv``), the output
# projection's and the MLP's only in llama and deci. A GGUF holding a tensor its graph does not create fails to
# load ("wrong number of tensors"), so a bias outside this set is dropped when it is zero (exact) and refused
# otherwise. tests/test_export_gguf.py runs each family with every bias it can state in llama.cpp itself.
_QKV_BIASES = frozenset({"attn_q", "attn_k", "attn_v"})
BIASES_READ: dict[str, frozenset[str]] = {
    "llama": _QKV_BIASES | {"attn_output", "ffn_gate", "ffn_up", "ffn_down"},
    "deci": _QKV_BIASES | {"attn_output", "ffn_gate", "ffn_up", "ffn_down"},
    "qwen2": _QKV_BIASES | {"output"},
    "qwen3": _QKV_BIASES,
    "gemma3": _QKV_BIASES,
}
# the GGUF tensor of each level-2 linear that compensation (FLAP, --compensate-mean) gives a bias
OUTPUT_BIAS_TENSOR = {"attention": "attn_output", "mlp": "ffn_down"}


def reads_bias(arch: str, tensor: str) -> bool:
    """Whether llama.cpp's ``arch`` graph loads a bias for GGUF tensor ``tensor`` (``attn_output``, ...)."""
    return tensor in BIASES_READ[arch]


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


def family_spec(model_type: str) -> ArchSpec:
    if model_type not in FAMILIES:
        raise ExportError(f"no GGUF export for model type {model_type!r}; supported: {', '.join(FAMILIES)}")
    return FAMILIES[model_type]


def check_prune_export(config: dict, layout: str, sparsity: float, uneven: bool,
                       bias_kinds: tuple[str, ...] | list[str] = ()) -> None:
    """Refuse ``daprune prune --gguf`` before pruning where the export after it would be refused: a family with no
    GGUF export, RoPE scaling or a Gemma-3 layout the writer refuses (read from the source model's ``config``, as
    the export reads the pruned one's), a source whose blocks differ already, per-layer widths that will differ
    (``uneven``: some blocks left whole, a schedule that gives blocks different shares; also a head/FFN split chosen
    per block, which in practice differs between blocks though it could come out alike) for a family whose
    llama.cpp graph takes one width for every block, or compensation biases (``bias_kinds``: "attention" for
    o_proj, "mlp" for down_proj) that the family's llama.cpp graph does not read."""
    from daprune.io_templates.modeling_daprune import base_model_type

    model_type = str(base_model_type(config.get("model_type")))
    spec = family_spec(model_type)
    check_rope(config)
    check_family(config, spec.uniform)

    def unread(kinds) -> list[str]:  # read by no graph the family is written as (the writer routes biases there)
        return [k for k in kinds if not any(reads_bias(a, OUTPUT_BIAS_TENSOR[k])
                                            for a in (spec.uniform, spec.per_layer, spec.general) if a)]

    # a FLAP / --compensate-mean output as the source: pruning keeps its compensation biases
    kept = unread(["attention" if "attn" in name else "mlp" for name in config.get("daprune_extra_biases") or []])
    if kept:
        raise ExportError(f"--gguf: the source carries {_linears(kept)} biases (FLAP's or --compensate-mean's "
                          f"compensation, config.daprune_extra_biases), which llama.cpp's {spec.uniform} graph does "
                          "not read, and pruning keeps them: drop --gguf")
    if added := unread(bias_kinds):
        raise ExportError(f"--gguf: this run may add biases to {_linears(added)} (--compensate-mean or the flap "
                          f"criterion), which llama.cpp's {spec.uniform} graph does not read (it loads q/k/v biases "
                          "only), so the GGUF export would refuse the result; drop --gguf, or prune without that "
                          "compensation")
    records = config.get("daprune_layers") or []  # a pruned folder as the source: its blocks' own widths
    if spec.per_layer is None and len({json.dumps(r, sort_keys=True) for r in records}) > 1:
        raise ExportError(f"--gguf: the source's blocks already have different widths, and llama.cpp has no "
                          f"per-layer graph for {model_type!r}; pruning cannot make them alike again: drop --gguf")
    if spec.per_layer is None and layout != "uniform" and sparsity > 0 and uneven:
        raise ExportError(f"--gguf: llama.cpp has no per-layer graph for {model_type!r}, and this run gives blocks "
                          "different widths (blocks left whole, a per-block schedule or head/FFN split, or a source "
                          "whose blocks differ already); add --layout uniform (same heads and FFN width in every "
                          "block), or prune every block alike (--layers 0: --head-split paper|ffn-only), or drop "
                          "--gguf")


def _linears(kinds: list[str]) -> str:
    return " and ".join(dict.fromkeys({"attention": "o_proj", "mlp": "down_proj"}[k] for k in kinds))


def own_graph_holds(arch: str, shapes: list[LayerShape], hidden: int, head_dim: int, level2_biases: bool) -> bool:
    """Whether llama.cpp's ``arch`` graph holds these uniform blocks. Its qwen2 graph sizes q_proj and o_proj as
    hidden x hidden (src/models/qwen2.cpp) and loads no o_proj or MLP bias, so heads pruned or compensation biases
    do not fit it; the other graphs size attention by heads x head_dim."""
    if arch != "qwen2":
        return True
    return not level2_biases and all(s.n_head * head_dim == hidden for s in shapes)


def choose_arch(model_type: str, shapes: list[LayerShape], hidden: int = 0, head_dim: int = 0,
                level2_biases: bool = False) -> str:
    """The GGUF architecture for this family and these shapes (and whether o_proj / MLP biases are present), or a
    one-line reason why there is none."""
    spec = family_spec(model_type)
    uniform, per_layer = spec.uniform, spec.per_layer
    if len(set(shapes)) <= 1:
        if own_graph_holds(uniform, shapes, hidden, head_dim, level2_biases) or spec.general is None:
            return uniform
        return spec.general
    if per_layer is None:
        raise ExportError(f"llama.cpp has no per-layer graph for {model_type!r}; prune with --layout uniform "
                          "(same heads and FFN width in every block) to export it")
    # deci.cpp: a block with no FFN is skipped whole ("continue" before the residual add), its attention too
    if bad := [i for i, s in enumerate(shapes) if s.n_ff == 0 and s.n_head > 0]:
        raise ExportError(f"block {bad[0]} keeps attention heads but no FFN channels, and llama.cpp's {per_layer} "
                          "graph skips such a block whole, its attention included: this model cannot be exported "
                          "to llama.cpp as it is (daprune's own prunes keep channels in every block)")
    return per_layer


def _rope_params(config: dict) -> list[dict]:
    """Every RoPE parameter set of a config: one, or one per layer type (Gemma-3: full and sliding attention)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if params and all(isinstance(v, dict) for v in params.values()):
        return list(params.values())
    return [params]


def rope_theta(config: dict) -> float:
    """``rope_theta`` from a transformers 4 (top level) or 5 (``rope_parameters``) config; with one set per
    layer type, the global (full-attention) layers' base, which is what llama.cpp's ``rope.freq_base`` means
    (its Gemma-3 graph uses 10,000 for the sliding-window layers itself)."""
    params = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if isinstance(params.get("full_attention"), dict):
        params = params["full_attention"]
    return float(params.get("rope_theta", config.get("rope_theta", 10000.0)))


def check_rope(config: dict) -> None:
    """Only plain RoPE is written; scaled variants (llama3, yarn, ...) need tensors or keys not handled here."""
    for params in _rope_params(config):
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", None):
            raise ExportError(f"RoPE scaling {kind!r} is not supported by the GGUF export (only plain RoPE)")


def check_family(config: dict, arch: str) -> None:
    """Refuse what llama.cpp's graph for ``arch`` would compute differently from transformers.

    llama.cpp's Gemma-3 graph hard-codes a global layer every 6th layer (the rest sliding-window), a RoPE
    base of 10,000 on the sliding layers, and no logit soft-capping; a config that says otherwise would
    export to a GGUF that runs but computes another model.
    """
    if arch != "gemma3":
        return
    types = config.get("layer_types")
    if types is not None:
        want = ["full_attention" if i % 6 == 5 else "sliding_attention" for i in range(len(types))]
        if list(types) != want:
            raise ExportError("llama.cpp's gemma3 graph puts a global-attention layer every 6th layer; this model's "
                              "layer_types differ, so its GGUF would compute another model")
    sliding = (config.get("rope_parameters") or {}).get("sliding_attention")
    if isinstance(sliding, dict) and float(sliding.get("rope_theta", 10000.0)) != 10000.0:
        raise ExportError("llama.cpp's gemma3 graph uses RoPE base 10000 on sliding-window layers; this model does not")
    for key in ("final_logit_softcapping", "attn_logit_softcapping"):
        if config.get(key):
            raise ExportError(f"llama.cpp's gemma3 graph applies no {key.replace('_', ' ')}; this model sets "
                              f"{key}={config[key]}")


def attention_window(config: dict, arch: str) -> int | None:
    """The sliding window transformers applies to some layers of this model that llama.cpp's ``arch`` graph does
    not (the llama, deci, qwen2 and qwen3 graphs attend to the whole context, so both compute the same only within
    it), by transformers' own rules: Mistral slides every layer by ``sliding_window`` (a config without the key
    gets MistralConfig's default, 4096; Mistral v0.2+ configs set null); Qwen2 / Qwen3 slide only with
    ``use_sliding_window``, the layers ``layer_types`` names (else those from ``max_window_layers`` on). None where
    nothing slides, or where the graph has its own window (gemma3, checked by :func:`check_family`)."""
    from daprune.io_templates.modeling_daprune import base_model_type

    if arch == "gemma3":
        return None
    family = base_model_type(config.get("model_type"))
    if family == "mistral":
        window = config.get("sliding_window", 4096)
        return int(window) if window else None
    if family in ("qwen2", "qwen3") and config.get("use_sliding_window") and config.get("sliding_window"):
        types = config.get("layer_types")
        n = int(config.get("num_hidden_layers", 0))
        slides = ("sliding_attention" in types if types
                  else int(config.get("max_window_layers", n)) < n)
        return int(config["sliding_window"]) if slides else None
    return None


def hparams(config: dict, shapes: list[LayerShape], head_dim: int, arch: str) -> dict[str, object]:
    """``GGUFWriter.add_<name>`` -> value; lists become the per-layer arrays the deci graph reads.

    ``context_length`` is the model's, or its sliding window where llama.cpp's graph ignores one
    (:func:`attention_window`): the GGUF then says how far it computes what transformers computes, and llama.cpp
    warns when asked for more."""
    per_layer = arch == "deci"
    context = int(config.get("max_position_embeddings", 2048))
    if (window := attention_window(config, arch)) is not None:
        context = min(context, window)

    def field(values: list[int]) -> int | list[int]:
        return list(values) if per_layer else int(values[0])

    return {
        "context_length": context,
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
        **({"sliding_window": int(config["sliding_window"])} if arch == "gemma3" and config.get("sliding_window")
           else {}),
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
