#!/usr/bin/env bash
# The main job: set up, prune the embedded SmolLM2-135M-Instruct by 20%, print the report and what pruning
# cost: dense vs pruned perplexity on held-out LAMBADA passages installed with the packages (never the
# calibration ones), plus WikiText-2 / PTB when a data folder is there.
# Extra arguments go to `daprune prune` (e.g. --recovery post, --calibration self; --model M also sets the
# dense model compared against).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
if [ -z "${DAPRUNE_DATA_DIR:-}" ] && [ -d ../shared/data ]; then export DAPRUNE_DATA_DIR="$(cd ../shared/data && pwd)"; fi
OUT=out/smollm2-135m-pruned20
CORPORA=lambada-heldout
if [ -n "${DAPRUNE_DATA_DIR:-}" ]; then CORPORA=lambada-heldout,wikitext2,ptb; fi
WINDOWS=${DAPRUNE_EVAL_WINDOWS:-24}   # evenly spaced 128-token windows per corpus, the same for dense and pruned
MODEL=()
prev=""
for a in "$@"; do [ "$prev" = "--model" ] && MODEL=(--model "$a"); prev=$a; done
daprune prune --out "$OUT" --overwrite --sparsity 0.2 --eval "$CORPORA" --max-windows "$WINDOWS" "$@"
echo "evaluating the dense model on the same windows ..."
daprune eval "${MODEL[@]}" --ppl "$CORPORA" --max-windows "$WINDOWS" --json "$OUT/dense_eval.json" --quiet \
  >/dev/null 2>"$OUT/dense_eval.log" || { cat "$OUT/dense_eval.log" >&2; exit 1; }
python - "$OUT/dense_eval.json" "$OUT/report.json" "$WINDOWS" <<'EOF'
import json, sys
dense = json.load(open(sys.argv[1]))["ppl"]
pruned = json.load(open(sys.argv[2]))["eval"]["ppl"]
print(f"\nWhat pruning cost: perplexity on {sys.argv[3]} evenly spaced 128-token windows per corpus "
      "(lambada-heldout: LAMBADA passages calibration never reads)")
print(f"{'corpus':<16} {'dense':>9} {'pruned':>9} {'change':>8}")
for name, d in dense.items():
    p = pruned[name]
    print(f"{name:<16} {d:>9.2f} {p:>9.2f} {100 * (p / d - 1):>+7.1f}%")
EOF
