"""Prune a mixture-of-experts model end to end with the CLI, on a machine with no MoE checkpoint.

No mixture-of-experts checkpoint installs from the package registries here, so this example builds a small
*randomly initialised* Qwen2-MoE (8 experts, top-2 routing, a shared expert, 6 layers) with the embedded
SmolLM2 tokenizer, saves it as an ordinary Hugging Face folder, and runs exactly what a user runs on a real
one (``daprune prune --model FOLDER``). It shows the workflow and the report (tokens routed to each
expert, kept channels, unrouted experts); its perplexities mean nothing, the weights being random.

    python examples/moe_tiny.py [WORK_DIR]        # default: ./runs/moe-example

For a real checkpoint the command is the same with ``--model`` pointing at it (e.g. a local copy of
``Qwen/Qwen1.5-MoE-A2.7B`` or ``mistralai/Mixtral-8x7B-v0.1``); see docs/moe.md.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from daprune.cli import main
from daprune.models.loading import resolve_source


def build(folder: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(resolve_source(None).path)
    config = AutoConfig.for_model(
        "qwen2_moe", vocab_size=len(tokenizer), hidden_size=256, num_hidden_layers=6, num_attention_heads=8,
        num_key_value_heads=4, head_dim=32, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=256,
        shared_expert_intermediate_size=512, intermediate_size=1024, max_position_embeddings=2048,
        tie_word_embeddings=True)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    tokenizer.save_pretrained(folder)


if __name__ == "__main__":
    work = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/moe-example")
    src, out = work / "qwen2-moe-random", work / "pruned"
    if not (src / "config.json").is_file():
        build(src)
    sys.exit(main(["prune", "--model", str(src), "--out", str(out), "--overwrite", "--sparsity", "0.2",
                   "--layers", "1:-1", "--nsamples", "16"]))
