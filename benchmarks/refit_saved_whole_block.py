"""What ``--refit-unpruned`` would have given a finished prune, without running the prune again.

Where a prune's allocation leaves exactly one block whole after the first pruned one, and it is the model's last
block, nothing upstream of it depends on the setting. So that block can be re-fitted afterwards exactly as the
pipeline would (``BlockPruner.prune(..., whole=True)`` under the run's own report.json settings, on the run's own
calibration and held-out rows rebuilt from their seeds), on the streams the saved pruned model and the dense model
give. The script checks that those streams reproduce the report's errors at that block, prints the re-fit's block
errors and strengths, and evaluates the re-fitted model on the run's corpora. docs/quality.md ("Re-fitting the
blocks left whole") used it on session 13's 50-minute SmolLM2 row:

    export DAPRUNE_DATA_DIR=/work/shared/data
    python benchmarks/refit_saved_whole_block.py runs/s13/sm256-coqaself-rem --max-windows 256 --json OUT.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from daprune.api import HELDOUT_SEED_OFFSET
from daprune.atomic import atomic_write_json
from daprune.config import PruneConfig
from daprune.criteria.base import get_criterion
from daprune.data.calibration import calibration_tokens
from daprune.data.generated import store_for
from daprune.evaluation.perplexity import evaluate
from daprune.models.adapter import get_adapter
from daprune.models.loading import load_model
from daprune.pipeline import BlockPruner, _rel, copy_block
from daprune.stores import ResidentStore


@torch.no_grad()
def block_inputs(model, ids: torch.Tensor, index: int, batch: int) -> torch.Tensor:
    """The hidden states that enter decoder layer ``index`` on ``ids``."""
    got: list[torch.Tensor] = []
    layer = model.model.layers[index]
    handle = layer.register_forward_pre_hook(
        lambda _m, args, kwargs: got.append((args[0] if args else kwargs["hidden_states"]).detach()), with_kwargs=True)
    try:
        for s in range(0, ids.shape[0], batch):
            model.model(ids[s : s + batch])
    finally:
        handle.remove()
    return torch.cat(got)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("pruned", help="output folder of a finished daprune prune (model + report.json)")
    ap.add_argument("--max-windows", type=int, default=None)
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--cache-dir", default=None)
    ap.add_argument("--json", default=None, help="write the errors, strengths and perplexities here")
    args = ap.parse_args(argv)

    report = json.loads((Path(args.pruned) / "report.json").read_text())
    names = {f.name for f in dataclasses.fields(PruneConfig)}
    cfg = dataclasses.replace(PruneConfig(**{k: v for k, v in report["settings"].items() if k in names}),
                              refit_unpruned=True)
    cfg.validate()
    layers = report["layers"]
    first = min(r["index"] for r in layers if r["pruned"])
    whole = [r["index"] for r in layers if not r["pruned"] and r["index"] > first]
    last = len(layers) - 1
    if whole != [last]:
        sys.exit(f"blocks left whole after the first pruned one: {whole}; this shortcut holds only where that is the "
                 f"last block alone ({last}): run daprune prune --refit-unpruned instead")
    if cfg.recovery_nsamples or not cfg.heldout_nsamples:
        sys.exit("the run used --recovery-nsamples or no --heldout-nsamples: not rebuilt here")

    t0 = time.perf_counter()
    dense, tok, source = load_model(cfg.model, cache=args.cache_dir)
    pruned, _, _ = load_model(args.pruned)
    generated = store_for(source, cfg.dtype, cfg.device, args.cache_dir)
    ids, _ = calibration_tokens(cfg.calibration, dense, tok, cfg.nsamples, cfg.seqlen, cfg.seed, args.data_dir,
                                cfg.self_gen, False, generated)
    held, _ = calibration_tokens(cfg.heldout_calibration or cfg.calibration, dense, tok, cfg.heldout_nsamples,
                                 cfg.seqlen, cfg.seed + HELDOUT_SEED_OFFSET, args.data_dir, cfg.self_gen, False,
                                 generated)
    n = ids.shape[0]
    ids = torch.cat([ids, held])
    xp, xd = (block_inputs(m, ids, last, cfg.batch_size) for m in (pruned, dense))

    adapter = get_adapter(dense)
    ctx = ResidentStore(adapter).layer_inputs(ids.shape[1])[last]
    block = adapter.block(last)
    block.to_canonical()
    reference = copy_block(block)
    with torch.no_grad():
        yd = reference.forward(xd, ctx)
        before = reference.forward(xp, ctx)
    out: dict = {"pruned": args.pruned, "block": last, "settings": dataclasses.asdict(cfg),
                 "reproduced": {"error_input": _rel(xp[:n], xd[:n]), "error": _rel(before[:n], yd[:n]),
                                "error_heldout": _rel(before[n:], yd[n:])},
                 "report": {k: layers[last][k] for k in ("error_input", "error", "error_heldout")}}
    pruner = BlockPruner(cfg, get_criterion("second-moment"), get_criterion("second-moment"), 0.0)
    pruner.n_score = pruner.n_fit = n
    pruner.ntokens = n * cfg.seqlen
    rec = pruner.prune(block, reference, xp, xd, yd, ctx, whole=True)
    with torch.no_grad():
        after = block.forward(xp, ctx)
    out["refit"] = {"error": _rel(after[:n], yd[:n]), "error_heldout": _rel(after[n:], yd[n:]),
                    "damping": {k: v.get("damp") for k, v in rec.damping.items()}}
    print(json.dumps({k: out[k] for k in ("reproduced", "report", "refit")}, indent=1), flush=True)
    block.to_native()
    pruned.model.layers[last].load_state_dict(adapter.model.model.layers[last].state_dict())
    corpora = ",".join(report["eval"]["ppl"]) if report.get("eval") else "wikitext2,ptb"
    out["ppl"] = evaluate(pruned, tok, ppl=corpora, data_dir=args.data_dir, max_windows=args.max_windows,
                          progress=False)["ppl"]
    out["ppl_before"] = report.get("eval", {}).get("ppl")
    out["seconds"] = time.perf_counter() - t0
    print(json.dumps({"ppl": out["ppl"], "ppl_before": out["ppl_before"]}, indent=1))
    if args.json:
        atomic_write_json(Path(args.json), out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
