"""Where a zero-shot loss comes from: HellaSwag per source (ActivityNet, WikiHow) and PIQA, with the gold answer's
and the wrong answers' log-likelihood per character (lm-eval's acc_norm compares exactly these).

A prune can lose accuracy because it likes the gold answer less, or because it likes the wrong ones (HellaSwag's
are machine-written, chosen to fool language models) more; the two columns tell which. Scores every
``--stride``-th document (default 10: 1,005 HellaSwag documents, 68% WikiHow, and 184 PIQA), through lm-eval as
``benchmarks/zeroshot_bench.py`` does; with the same ``--request-cache`` as an earlier stride run of the same model
and thread count, nothing is scored again.

    python benchmarks/answer_margins.py dense= ours=OUT peer=PEER --request-cache DIR --json FILE
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def margins(samples: dict[str, list[dict]]) -> dict[str, dict[str, float]]:
    """Per part (HellaSwag's sources, PIQA): acc_norm, acc, the mean per-character log-likelihood of the gold answer
    and of the wrong ones, and the mean margin of the gold answer over the best wrong one."""
    parts: dict[str, dict[str, float]] = {}
    for task, rows in samples.items():
        for s in rows:
            doc = s["doc"]
            part = doc["source_id"].split("~")[0] if task == "hellaswag" else task
            choices = doc["choices"] if task == "hellaswag" else [doc["sol1"], doc["sol2"]]
            per_char = [float(r[0]) / len(c) for r, c in zip(s["filtered_resps"], choices, strict=True)]
            gold = int(s["target"])
            wrong = [p for i, p in enumerate(per_char) if i != gold]
            d = parts.setdefault(part, dict.fromkeys(("acc_norm", "acc", "gold", "wrong", "margin", "n"), 0.0))
            d["acc_norm"] += s.get("acc_norm", s["acc"])
            d["acc"] += s["acc"]
            d["gold"] += per_char[gold]
            d["wrong"] += sum(wrong) / len(wrong)
            d["margin"] += per_char[gold] - max(wrong)
            d["n"] += 1
    for d in parts.values():
        for key in ("acc_norm", "acc", "gold", "wrong", "margin"):
            d[key] /= d["n"]
    return parts


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("models", nargs="+", metavar="LABEL=FOLDER", help="an empty FOLDER: the embedded SmolLM2")
    parser.add_argument("--stride", type=int, default=10)
    parser.add_argument("--request-cache", default=None, metavar="DIR")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    if any("=" not in m for m in args.models):
        parser.error("give each model as LABEL=FOLDER")
    torch.set_num_threads(args.threads)
    from daprune.evaluation.zeroshot import evaluate_zeroshot
    from daprune.models.loading import load_model

    out = {}
    for spec in args.models:
        label, folder = spec.split("=", 1)
        model, tokenizer, _ = load_model(folder or None, dtype="float32")
        res = evaluate_zeroshot(model.eval(), tokenizer, ["hellaswag", "piqa"], stride=args.stride, progress=False,
                                log_samples=True, request_cache=args.request_cache)
        out[label] = margins(res["samples"])
    print("| model | part | n | acc_norm | acc | gold / char | wrong / char | gold - best wrong |")
    print("|---|---|---|---|---|---|---|---|")
    for label, parts in out.items():
        for part, d in parts.items():
            print(f"| {label} | {part} | {int(d['n'])} | {100 * d['acc_norm']:.1f} | {100 * d['acc']:.1f} | "
                  f"{d['gold']:.3f} | {d['wrong']:.3f} | {d['margin']:+.3f} |")
    if args.json:
        from daprune.atomic import atomic_write_json

        atomic_write_json(args.json, {"command": " ".join(sys.argv), "stride": args.stride, "threads": args.threads,
                                      "models": out})


if __name__ == "__main__":
    main()
