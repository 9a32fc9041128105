"""Write a daprune output folder (or any Llama-family HF folder) as a GGUF file with ``gguf.GGUFWriter``.

Tensors are streamed: tensor infos are computed from the safetensors headers, then every tensor is read,
converted and written one at a time, so memory holds one tensor, not the model. The file is written
beside the target and renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFWriter, LlamaFileType, get_tensor_name_map
from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES, MODEL_TENSORS
from gguf.quants import quantize
from safetensors import safe_open

from daprune.export.arch import (
    META_ROPE,
    ExportError,
    check_family,
    check_rope,
    choose_arch,
    family_spec,
    hparams,
    layer_shapes,
    reads_bias,
    to_gguf_rotary,
)
from daprune.export.tokenizer import tokenizer_fields
from daprune.io_templates.modeling_daprune import base_model_type

OUTTYPES = {
    "f32": (GGMLQuantizationType.F32, LlamaFileType.ALL_F32),
    "f16": (GGMLQuantizationType.F16, LlamaFileType.MOSTLY_F16),
    "bf16": (GGMLQuantizationType.BF16, LlamaFileType.MOSTLY_BF16),
    "q8_0": (GGMLQuantizationType.Q8_0, LlamaFileType.MOSTLY_Q8_0),
}


# biases of the output projection and the MLP: llama.cpp's qwen2 graph loads none (qwen2 then goes to llama)
_LEVEL2_BIASES = ("o_proj.bias", "gate_proj.bias", "up_proj.bias", "down_proj.bias")


@dataclass
class ExportResult:
    """What was written, for the CLI's summary and the tests."""

    path: Path
    arch: str
    outtype: str
    tensors: int
    tokenizer_source: str
    per_layer: dict[str, list[int]] = field(default_factory=dict)
    fallback_f16: list[str] = field(default_factory=list)  # q8_0 tensors whose rows are not whole blocks
    dropped_zero_biases: list[str] = field(default_factory=list)  # all-zero biases the arch's graph does not read
    notes: list[str] = field(default_factory=list)  # where llama.cpp computes other than transformers, and why


def _weight_files(folder: Path) -> list[Path]:
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ExportError(f"{folder} has no .safetensors weights")
    return files


def _tensor_shapes(files: list[Path]) -> dict[str, tuple[tuple[int, ...], Path]]:
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    for f in files:
        with safe_open(f, framework="pt") as st:
            for name in st.keys():  # noqa: SIM118 - safe_open is not a mapping
                shapes[name] = (tuple(st.get_slice(name).get_shape()), f)
    return shapes


def _qtype_for(name: str, shape: tuple[int, ...], wanted: GGMLQuantizationType) -> GGMLQuantizationType:
    """Norms and biases stay f32 (as llama.cpp's converter does); quantized rows must be whole blocks."""
    if len(shape) < 2:
        return GGMLQuantizationType.F32
    block = GGML_QUANT_SIZES[wanted][0]
    if shape[-1] % block:
        return GGMLQuantizationType.F16
    return wanted


def _encode(data: np.ndarray, qtype: GGMLQuantizationType) -> np.ndarray:
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(data, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(data, dtype=np.float16)
    return quantize(np.ascontiguousarray(data, dtype=np.float32), qtype)


def _info(shape: tuple[int, ...], qtype: GGMLQuantizationType) -> tuple[tuple[int, ...], np.dtype, int]:
    """(shape as add_tensor_info wants it, numpy dtype, bytes) without converting the data."""
    n = int(np.prod(shape)) if shape else 1
    if qtype == GGMLQuantizationType.F32:
        return shape, np.dtype(np.float32), 4 * n
    if qtype == GGMLQuantizationType.F16:
        return shape, np.dtype(np.float16), 2 * n
    block, size = GGML_QUANT_SIZES[qtype]
    byte_shape = (*shape[:-1], shape[-1] // block * size)
    return byte_shape, np.dtype(np.uint8), int(np.prod(byte_shape))


def export_gguf(folder: str | os.PathLike, out: str | os.PathLike, *, outtype: str = "f16",
                tokenizer_gguf: str | os.PathLike | None = None) -> ExportResult:
    """Write ``folder`` (config.json + safetensors + tokenizer) as the GGUF file ``out``."""
    folder, out = Path(folder), Path(out)
    if outtype not in OUTTYPES:
        raise ExportError(f"unknown --outtype {outtype!r}; choose from {', '.join(OUTTYPES)}")
    if not (folder / "config.json").is_file():
        raise ExportError(f"{folder} is not a model folder (no config.json)")
    config = json.loads((folder / "config.json").read_text())
    check_rope(config)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    files = _weight_files(folder)
    shapes = _tensor_shapes(files)
    layers = layer_shapes({k: v[0] for k, v in shapes.items()}, int(config["num_hidden_layers"]), head_dim)
    family = str(base_model_type(config.get("model_type")))
    level2 = any(n.endswith(_LEVEL2_BIASES) and 0 not in shapes[n][0] for n in shapes)
    arch = choose_arch(family, layers, int(config["hidden_size"]), head_dim, level2)
    spec = family_spec(family)
    check_family(config, arch)
    gguf_arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == arch)
    names, dropped = _tensor_names(shapes, gguf_arch, len(layers), config)
    wanted, ftype = OUTTYPES[outtype]

    writer = GGUFWriter(path=None, arch=arch)
    writer.add_name(str(config.get("_name_or_path") or folder.name) + " (daprune)")
    writer.add_file_type(int(ftype))
    params = hparams(config, layers, head_dim, arch)
    for key, value in params.items():
        getattr(writer, f"add_{key}")(value)
    rows = shapes["model.embed_tokens.weight"][0][0] if "model.embed_tokens.weight" in shapes else None
    tok_fields, tok_source = tokenizer_fields(folder, rows or int(config["vocab_size"]), tokenizer_gguf)
    for key, value, vtype, sub in tok_fields:
        writer.add_key_value(key, value, vtype, sub_type=sub)
    writer.add_quantization_version(2)

    plan, fallback = [], []
    for hf_name, gguf_name in names:
        shape = shapes[hf_name][0]
        qtype = _qtype_for(gguf_name, shape, wanted)
        if qtype != wanted and len(shape) >= 2:
            fallback.append(gguf_name)
        info_shape, dtype, nbytes = _info(shape, qtype)
        writer.add_tensor_info(gguf_name, info_shape, dtype, nbytes, raw_dtype=qtype)
        plan.append((hf_name, gguf_name, qtype))

    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        writer.write_header_to_file(tmp)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for hf_name, _gguf_name, qtype in plan:
            data = _read(shapes[hf_name][1], hf_name, layers, head_dim, arch in META_ROPE)
            if spec.norm_shift and "norm" in hf_name:  # Gemma: x * (1 + w) in transformers, x * w in llama.cpp
                data = data + np.float32(spec.norm_shift)
            writer.write_tensor_data(_encode(data, qtype))
        writer.close()
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            tmp.unlink()
    per_layer = {"head_count": [s.n_head for s in layers], "head_count_kv": [s.n_head_kv for s in layers],
                 "feed_forward_length": [s.n_ff for s in layers]}
    notes = []
    if (window := params["context_length"]) < int(config.get("max_position_embeddings", 2048)):  # hparams cut it
        notes.append(f"sliding-window attention (window {window}) is not in llama.cpp's {arch} graph, which attends "
                     f"to the whole context: context_length is written as {window}, where both compute the same")
    return ExportResult(out, arch, outtype, len(plan), tok_source, per_layer, fallback, dropped, notes)


def _tensor_names(shapes: dict, arch: MODEL_ARCH, n_layers: int,
                  config: dict) -> tuple[list[tuple[str, str]], list[str]]:
    """(HF name, GGUF name) for every tensor written, and the HF names of all-zero biases left out because the
    graph does not read them (a Qwen3 or Gemma-3 with ``attention_bias`` has an o_proj bias, llama.cpp's graphs
    none). Unknown tensors and nonzero unread biases are an error, not silently dropped."""
    pairs, dropped, refused = _classify(shapes, arch, n_layers, config)
    if refused:
        hf_name, why = refused[0]
        raise ExportError(f"{hf_name} is a nonzero bias, and {why}; this model cannot be exported to llama.cpp as it "
                          "is" + (f" ({len(refused) - 1} more such biases)" if len(refused) > 1 else ""))
    return pairs, dropped


def _classify(shapes: dict, arch: MODEL_ARCH, n_layers: int,
              config: dict) -> tuple[list[tuple[str, str]], list[str], list[tuple[str, str]]]:
    """Every tensor of ``shapes`` as written ((HF, GGUF) name), left out (HF names of all-zero unread biases) or
    refused ((HF name, why) of nonzero unread biases). A bias is unread where llama.cpp's graph loads none for
    that tensor (``arch.BIASES_READ``), and where its linear has no weights left (a block that lost every head or
    channel: the graph skips that part, while transformers still adds the bias)."""
    tmap = get_tensor_name_map(arch, n_layers)
    allowed = set(MODEL_TENSORS[arch])
    arch_name = MODEL_ARCH_NAMES[arch]
    empty = {n for n, (shape, _) in shapes.items() if any(d == 0 for d in shape)}
    pairs, dropped, refused = [], [], []
    for hf_name in sorted(shapes, key=_order):
        if hf_name == "lm_head.weight" and config.get("tie_word_embeddings", False):
            continue  # tied: llama.cpp reuses token_embd when output.weight is absent
        if hf_name in empty and not hf_name.endswith(".bias"):
            continue  # a block that lost all heads or channels (its count in the metadata is 0)
        found = tmap.get_type_and_name(hf_name, try_suffixes=(".weight", ".bias"))
        if found is None or found[0] not in allowed:
            raise ExportError(f"tensor {hf_name} has no place in a {arch.name.lower()} GGUF")
        gguf_name = found[1]
        if gguf_name.endswith(".bias"):
            tensor = gguf_name.split(".")[-2]
            why = (f"llama.cpp's {arch_name} graph reads no {tensor} bias (a GGUF holding one does not load)"
                   if not reads_bias(arch_name, tensor) else
                   f"its linear has no weights left, and llama.cpp's {arch_name} graph skips that part of the block"
                   if hf_name.removesuffix(".bias") + ".weight" in empty else None)
            if why is not None:
                with safe_open(shapes[hf_name][1], framework="pt") as st:
                    bias = st.get_tensor(hf_name)
                if bias.numel() and bool(bias.count_nonzero()):
                    refused.append((hf_name, why))
                else:
                    dropped.append(hf_name)  # zero: leaving it out computes the same
                continue
        pairs.append((hf_name, gguf_name))
    return pairs, dropped, refused


def unread_nonzero_biases(folder: str | os.PathLike) -> list[tuple[str, str]]:
    """The nonzero biases of ``folder``'s weights that the writer would refuse for its family, as (HF name, why):
    what ``prune --gguf`` refuses before pruning a source that carries them (pruning keeps every bias)."""
    folder = Path(folder)
    if not any(folder.glob("*.safetensors")):  # .bin weights: pruning writes safetensors, which the writer checks
        return []
    config = json.loads((folder / "config.json").read_text())
    spec = family_spec(str(base_model_type(config.get("model_type"))))
    arch = next(a for a, n in MODEL_ARCH_NAMES.items() if n == (spec.general or spec.uniform))  # biases go there
    shapes = _tensor_shapes(_weight_files(folder))
    # the biases and their linears' weights only: another stray tensor is the writer's to refuse, not this check's
    linears = {n.removesuffix(".bias") for n in shapes if n.endswith(".bias")}
    shapes = {n: v for n, v in shapes.items() if n.removesuffix(".bias").removesuffix(".weight") in linears}
    try:
        return _classify(shapes, arch, int(config["num_hidden_layers"]), config)[2]
    except ExportError:
        return []


def _order(name: str) -> tuple:
    """Embeddings first, then blocks in numeric order, then the final norm and head (as converters write)."""
    parts = name.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return (1, int(parts[i + 1]), name)
    return (0 if "embed" in name else 2, 0, name)


def _read(file: Path, hf_name: str, layers, head_dim: int, meta_rope: bool) -> np.ndarray:
    with safe_open(file, framework="pt") as st:
        t = st.get_tensor(hf_name).to(torch.float32)
    data = t.numpy()
    if meta_rope and (".q_proj." in hf_name or ".k_proj." in hf_name):
        block = layers[int(hf_name.split(".")[2])]
        data = to_gguf_rotary(data, block.n_head if ".q_proj." in hf_name else block.n_head_kv)
    return data
