"""Exported GGUFs in a real llama.cpp (llama-cpp-python) against the transformers models they came from.

For each model folder (dense SmolLM2, a uniform pruned one, the default per-layer pruned one): export a GGUF
per --outtype, then in llama.cpp
  * next-token log-probabilities on a fixed text vs transformers (fp32): max |difference| at the true next
    token, over the whole vocabulary, and top-1 agreement;
  * perplexity on evenly spaced 128-token WikiText-2 windows vs transformers' on the same windows;
  * a greedy generation;
  * tokens/s for prompt processing (128 tokens) and generation (64 tokens), next to transformers' figures.
Every llama.cpp measurement runs in a child process, so a crash (e.g. a quantized type's kernel) becomes a
row that says so instead of ending the run.

    DAPRUNE_DATA_DIR=../shared/data python benchmarks/llamacpp_bench.py --pruned /tmp/x --uniform /tmp/u \\
        --json docs/llamacpp_bench.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TEXT = ("The capital of France is Paris. It is known for the Eiffel Tower, which was built in 1889 for the "
        "World's Fair. Today millions of visitors climb it every year to look over the city and the river Seine.")
PROMPT = "The capital of France is"


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


# -- llama.cpp side (child process) -----------------------------------------------------------------------


def worker(gguf: str, task_file: str, threads: int) -> dict:
    """Run in a child: logits on the fixed text, window NLLs, greedy text, speed. Prints one JSON line."""
    from llama_cpp import Llama

    task = json.loads(Path(task_file).read_text())
    out: dict = {}
    llm = Llama(model_path=gguf, n_ctx=512, logits_all=True, n_threads=threads, n_threads_batch=threads,
                verbose=False, n_batch=512)
    ids = task["text_ids"]
    llm.reset()
    llm.eval(ids)
    np.save(task["logits_file"], np.asarray(llm.scores[: len(ids)], dtype=np.float32))  # not through JSON: 9 MB
    nll, count = 0.0, 0
    for w in task["windows"]:
        llm.reset()
        llm.eval(w)
        lp = log_softmax(np.asarray(llm.scores[: len(w)]))
        nll -= float(lp[np.arange(len(w) - 1), w[1:]].sum())
        count += len(w) - 1
    out["window_nll"], out["window_tokens"] = nll, count
    del llm
    fast = Llama(model_path=gguf, n_ctx=512, logits_all=False, n_threads=threads, n_threads_batch=threads,
                 verbose=False, n_batch=512)
    gen = fast.create_completion(task["prompt"], max_tokens=16, temperature=0.0, top_k=1)
    out["generation"] = gen["choices"][0]["text"]
    prompt, new = task["speed_prompt"], task["new_tokens"]
    pp, tg = [], []
    for _ in range(task["repeats"]):
        fast.reset()
        t0 = time.perf_counter()
        fast.eval(prompt)
        t1 = time.perf_counter()
        for _ in range(new):  # greedy decode, one token per llama_decode call
            fast.eval([int(np.argmax(fast.scores[fast.n_tokens - 1]))])
        t2 = time.perf_counter()
        pp.append(len(prompt) / (t1 - t0))
        tg.append(new / (t2 - t1))
    out["prompt_tok_s"], out["gen_tok_s"] = float(np.median(pp)), float(np.median(tg))
    return out


def run_worker(gguf: Path, task_file: Path, threads: int, timeout: int = 1200) -> dict:
    logits = task_file.parent / f"{gguf.stem}.logits.npy"
    task = json.loads(task_file.read_text())
    task_file = task_file.with_name(f"task-{gguf.stem}.json")
    task_file.write_text(json.dumps({**task, "logits_file": str(logits)}))
    proc = subprocess.run([sys.executable, __file__, "--worker", str(gguf), "--task", str(task_file),
                           "--threads", str(threads)], capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        signal = -proc.returncode if proc.returncode < 0 else None
        return {"error": f"llama.cpp process ended with {'signal ' + str(signal) if signal else proc.returncode}",
                "stderr_tail": proc.stderr[-800:]}
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["text_logits"] = np.load(logits)
    return out


# -- transformers side --------------------------------------------------------------------------------------


def hf_side(folder: str, text_ids, windows, speed_prompt, new_tokens: int, repeats: int) -> dict:
    import torch

    import daprune

    model, _ = daprune.load(folder)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([text_ids])).logits[0].float().numpy()
        nll, count = 0.0, 0
        for w in windows:
            lp = torch.log_softmax(model(input_ids=torch.tensor([w])).logits[0].double(), -1)
            nll -= float(lp[torch.arange(len(w) - 1), torch.tensor(w[1:])].sum())
            count += len(w) - 1
        ids = torch.tensor([speed_prompt])
        pp, tg = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            model(input_ids=ids)
            pp.append(len(speed_prompt) / (time.perf_counter() - t0))
            t0 = time.perf_counter()
            model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                           min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
            total = time.perf_counter() - t0
            tg.append(new_tokens / max(total - len(speed_prompt) / pp[-1], 1e-9))
    params = sum(p.numel() for p in model.parameters())
    return {"text_logits": logits, "window_nll": nll, "window_tokens": count, "params": params,
            "prompt_tok_s": float(np.median(pp)), "gen_tok_s": float(np.median(tg))}


def compare(hf: dict, cpp: dict, text_ids) -> dict:
    a = log_softmax(np.asarray(cpp["text_logits"]))
    b = log_softmax(hf["text_logits"])
    nxt = np.asarray(text_ids[1:])
    rows = np.arange(len(nxt))
    return {
        "max_abs_dlogprob_next_token": float(np.abs(a[rows, nxt] - b[rows, nxt]).max()),
        "max_abs_dlogprob_vocab": float(np.abs(a - b).max()),
        "top1_agreement": float((a.argmax(-1) == b.argmax(-1)).mean()),
        "ppl_llamacpp": math.exp(cpp["window_nll"] / cpp["window_tokens"]),
        "ppl_transformers": math.exp(hf["window_nll"] / hf["window_tokens"]),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--task", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--pruned", default=None, help="per-layer pruned folder (daprune prune --out ...)")
    ap.add_argument("--uniform", default=None, help="uniform pruned folder (no daprune_layers in config.json)")
    ap.add_argument("--dense", default=None,
                    help="dense folder (default: the converted embedded SmolLM2; 'none': skip the dense rows)")
    ap.add_argument("--extra-gguf", action="append", default=[],
                    help="NAME=FILE: also run this GGUF in llama.cpp (e.g. the packaged Q4_1) and report if it works")
    ap.add_argument("--windows", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2, help="timed runs per speed figure (median)")
    ap.add_argument("--q8-models", default="per-layer pruned",
                    help="models (comma separated names) that also get a q8_0 row; f16 for every model")
    ap.add_argument("--gguf-dir", default=None, help="where GGUFs are written (default: a temp folder)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker, args.task, args.threads)))
        return

    import torch

    torch.set_num_threads(args.threads)
    from daprune.data.text import load_text
    from daprune.data.tokens import bos_per_window, encode_stream, prepend_bos
    from daprune.evaluation.perplexity import windows
    from daprune.export import export_gguf
    from daprune.models.loading import load_model, resolve_source

    dense = args.dense if args.dense not in (None, "none") else resolve_source(None).path
    _, tok, _ = load_model(dense)
    text_ids = tok(TEXT)["input_ids"]
    bos = bos_per_window(tok)  # Gemma: BOS in front of every window, as daprune's evaluation does
    stream = encode_stream(tok, load_text("wikitext2"), bos)
    wins = windows(stream, 128, args.windows)
    wins = (prepend_bos(wins, tok.bos_token_id) if bos else wins).tolist()
    speed_prompt = stream[:128].tolist()
    gdir = Path(args.gguf_dir or tempfile.mkdtemp(prefix="daprune-gguf-"))
    gdir.mkdir(parents=True, exist_ok=True)
    task_file = gdir / "task.json"
    task_file.write_text(json.dumps({"text_ids": text_ids, "windows": wins, "prompt": PROMPT,
                                     "speed_prompt": speed_prompt, "new_tokens": args.new_tokens,
                                     "repeats": args.repeats}))
    models = [("per-layer pruned", args.pruned), ("uniform pruned", args.uniform),
              ("dense", None if args.dense == "none" else dense)]
    results = []
    for name, folder in models:
        if not folder:
            continue
        t0 = time.perf_counter()
        hf = hf_side(folder, text_ids, wins, speed_prompt, args.new_tokens, args.repeats)
        print(f"{name}: transformers done in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
        types = ["f16", "q8_0"] if name in args.q8_models.split(",") else ["f16"]
        for outtype in types:
            path = gdir / f"{name.replace(' ', '-')}-{outtype}.gguf"
            res = export_gguf(folder, path, outtype=outtype)
            cpp = run_worker(path, task_file, args.threads)
            row = {"model": name, "folder": str(folder), "outtype": outtype, "arch": res.arch,
                   "gguf_mib": path.stat().st_size / 2**20, "params": hf["params"],
                   "hf_prompt_tok_s": hf["prompt_tok_s"], "hf_gen_tok_s": hf["gen_tok_s"]}
            if "error" in cpp:
                row.update(cpp)
            else:
                row.update(compare(hf, cpp, text_ids))
                row.update({k: cpp[k] for k in ("generation", "prompt_tok_s", "gen_tok_s")})
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "stderr_tail"}), file=sys.stderr, flush=True)
    for spec in args.extra_gguf:
        name, path = spec.split("=", 1)
        cpp = run_worker(Path(path), task_file, args.threads)
        row = {"model": name, "gguf": path, "outtype": "as shipped"}
        row.update(cpp if "error" in cpp else {"generation": cpp["generation"],
                                               "ppl_llamacpp": math.exp(cpp["window_nll"] / cpp["window_tokens"]),
                                               "prompt_tok_s": cpp["prompt_tok_s"], "gen_tok_s": cpp["gen_tok_s"]})
        results.append(row)
    print_table(results)
    if args.json:
        import llama_cpp

        meta = {"windows": args.windows, "seqlen": 128, "bos_per_window": bos, "dense": dense,
                "threads": args.threads, "new_tokens": args.new_tokens,
                "text": TEXT, "prompt": PROMPT, "llama_cpp_python": llama_cpp.__version__,
                "cpu": _cpu(), "data": os.environ.get("DAPRUNE_DATA_DIR")}
        Path(args.json).write_text(json.dumps({"settings": meta, "rows": results}, indent=2) + "\n")


def _cpu() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def print_table(rows: list[dict]) -> None:
    head = ["model", "type", "arch", "MiB", "max|dlogp| next", "top-1 agree", "ppl llama.cpp", "ppl HF", "ppl diff",
            "pp tok/s cpp", "tg tok/s cpp", "pp tok/s HF", "tg tok/s HF"]
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append([r["model"], r.get("outtype", ""), r.get("arch", ""), "", r["error"]] + [""] * 8)
            continue

        def f(key, fmt="{:.2f}", r=r):
            return fmt.format(r[key]) if key in r else ""

        diff = (f"{100 * (r['ppl_llamacpp'] / r['ppl_transformers'] - 1):+.2f}%"
                if "ppl_transformers" in r else "")
        lines.append([r["model"], r.get("outtype", ""), r.get("arch", ""), f("gguf_mib", "{:.0f}"),
                      f("max_abs_dlogprob_next_token", "{:.4f}"), f("top1_agreement", "{:.3f}"), f("ppl_llamacpp"),
                      f("ppl_transformers"), diff, f("prompt_tok_s", "{:.0f}"), f("gen_tok_s", "{:.1f}"),
                      f("hf_prompt_tok_s", "{:.0f}"), f("hf_gen_tok_s", "{:.1f}")])
    widths = [max(len(str(line[i])) for line in lines) for i in range(len(head))]
    for line in lines:
        print(" | ".join(str(c).ljust(w) for c, w in zip(line, widths, strict=True)))
    for r in rows:
        if "generation" in r:
            print(f"{r['model']} [{r.get('outtype')}]: {PROMPT!r} -> {r['generation']!r}")


if __name__ == "__main__":
    main()
