"""Up-front resource checks: will a run fit in this machine's memory and disk?

A run that cannot fit should be refused in a second, with the numbers, instead of failing minutes later
in the allocator (a traceback) or on a full disk (half a work folder). The estimate counts what the
pipeline really holds at its peak (see docs/scaling.md, "Peak memory"):

* the two activation streams (the dense targets and the pruned stream), ``tokens x hidden`` each in the run's
  dtype, in RAM unless ``--activations disk`` maps them to files in the work folder;
* the pruner's statistics: fp32 second moments of each linear's input, plus the fp64 FFN x FFN matrices
  of greedy / OBS channel selection;
* one dense block and its working copy, plus one batch's attention probabilities (the head criterion
  builds them explicitly);
* the calibration ids, and the weights that are resident besides the block: the embedding while
  streaming, the whole model in memory otherwise;
* the gradient pre-passes on the dense model (Taylor criteria, ``--error-weight fisher|kfac``), which run before
  the first block, so RAM takes the larger of that pass and the pipeline's peak: block by block (streaming) the
  pass keeps every block's input and two fp32 gradient streams (in files under ``--activations disk``) and one
  block's autograd graph; in memory it keeps one batch's graph of every layer. Taylor adds the weight gradients
  and their fp32 sums (one block's streaming, all blocks' in memory), fisher/kfac its per-block accumulators;
  what the pipeline then holds of their results (one block's gradients read from the work folder, the fisher
  weights and their square roots) is counted with the pipeline, and their files with the work folder.

It is an estimate of the peak, not a bound: the interpreter and library code (about 0.5 GiB) come on top
and are counted as a fixed overhead. The numbers go into ``report.json`` (``resources``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from daprune.errors import ResourceError

GiB = 2**30
MiB = 2**20
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# the interpreter with torch and transformers imported (measured: about 0.5 GiB, docs/scaling.md)
OVERHEAD_BYTES = 512 * MiB
# greedy / OBS channel selection keeps about two fp64 FFN x FFN matrices at once
SELECTION_MATRICES = 2


@dataclass(frozen=True)
class ModelDims:
    """The few shape numbers of a decoder that the estimate needs (read from its config)."""

    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    vocab: int
    tied: bool

    @classmethod
    def from_config(cls, config) -> ModelDims:
        """Dims of a transformers config (or a dict); ``check_model_config`` has validated them."""
        def get(name: str, default=None):
            value = config.get(name) if isinstance(config, dict) else getattr(config, name, None)
            return default if value is None else value

        heads = get("num_attention_heads")
        hidden = get("hidden_size")
        return cls(hidden=hidden, intermediate=get("intermediate_size", 4 * hidden), heads=heads,
                   kv_heads=get("num_key_value_heads", heads), head_dim=get("head_dim", hidden // heads),
                   layers=get("num_hidden_layers"), vocab=get("vocab_size"), tied=bool(get("tie_word_embeddings")))

    @property
    def block_params(self) -> int:
        attn = self.hidden * self.head_dim * (2 * self.heads + 2 * self.kv_heads)  # q, o and k, v
        return attn + 3 * self.hidden * self.intermediate + 2 * self.hidden  # gate, up, down; two norms

    @property
    def total_params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return embeddings + self.layers * self.block_params + self.hidden


@dataclass
class Estimate:
    """Bytes one run needs, by part; ``ram`` and ``disk`` are what the checks compare with what is free."""

    streams: int  # both activation streams together
    statistics: int
    block: int  # one dense block and its working copy
    attention: int  # one batch's explicit attention probabilities
    ids: int
    resident_weights: int
    output: int  # the pruned model's weights as written
    streams_on_disk: bool
    overhead: int = OVERHEAD_BYTES
    gradient_pass: int = 0  # the largest gradient pre-pass, everything in RAM (resident weights and ids apart)
    gradient_inputs: int = 0  # of which the streamed pass's block inputs and gradient streams (files with disk)
    gradients_held: int = 0  # what the pipeline holds of the pre-passes' results
    gradient_files: int = 0  # the pre-passes' files in the work folder
    numbers: dict = field(default_factory=dict)

    @property
    def pipeline_ram(self) -> int:
        """The block loop's own peak: streams, statistics, the block and its copy, attention maps."""
        streams = 0 if self.streams_on_disk else self.streams
        return streams + self.statistics + self.block + self.attention + self.gradients_held

    @property
    def gradient_ram(self) -> int:
        """The gradient pre-pass's peak (it ends before the block loop starts)."""
        return self.gradient_pass - (self.gradient_inputs if self.streams_on_disk else 0)

    @property
    def ram(self) -> int:
        return max(self.pipeline_ram, self.gradient_ram) + self.ids + self.resident_weights + self.overhead

    @property
    def work_disk(self) -> int:
        """The work folder: pruned block shards, the streams (memory-mapped, or one checkpoint of them) or, where
        larger, the gradient pass's block inputs in files, and the pre-passes' files."""
        inputs = self.gradient_inputs if self.streams_on_disk else 0
        return self.output + max(self.streams, inputs) + self.gradient_files

    def to_dict(self) -> dict:
        return {**asdict(self), "ram": self.ram, "pipeline_ram": self.pipeline_ram, "gradient_ram": self.gradient_ram,
                "work_disk": self.work_disk}


@dataclass(frozen=True)
class GradientPasses:
    """Which gradient pre-passes a run makes, over how many calibration rows (0: none)."""

    taylor_rows: int = 0  # a Taylor criterion's weight gradients
    fisher_rows: int = 0  # --error-weight fisher|kfac
    kfac: bool = False  # fisher's [hidden, hidden] matrices instead of its diagonals
    work_folder: bool = True  # results kept in files (read one block at a time) rather than in RAM


def _backward(dims: ModelDims, rows: int, seqlen: int, batch_size: int, nbytes: int, streaming: bool
              ) -> tuple[int, int]:
    """Bytes of one next-token backward over ``rows``, and of those the streamed pass's block inputs and its two
    fp32 gradient streams. Per token, a block keeps about 8 hidden-wide and 4 FFN-wide tensors for its backward
    (Megatron-LM's activation count, less the attention matrix: SDPA / flash attention keep none); the LM head's
    logits, their fp32 copy and gradient come on top (one row at a time streaming, one batch in memory)."""
    batch = min(batch_size, rows)
    graph = batch * seqlen * nbytes * (8 * dims.hidden + 4 * dims.intermediate)
    logits = 3 * 4 * seqlen * dims.vocab
    if not streaming:
        return dims.layers * graph + batch * logits, 0
    inputs = rows * seqlen * dims.hidden * ((dims.layers + 1) * nbytes + 2 * 4)
    return inputs + graph + logits, inputs


def _fisher_block(dims: ModelDims, kfac: bool) -> int:
    """Bytes of one block's fisher (kfac) weights: o and down, a diagonal (a matrix) each, fp32."""
    return 2 * dims.hidden * (dims.hidden if kfac else 1) * 4


def _taylor_pass(dims: ModelDims, rows: int, seqlen: int, batch_size: int, nbytes: int, streaming: bool
                 ) -> tuple[int, int]:
    """The Taylor gradient pass: the backward, each weight's gradient in the run's dtype and its fp32 sum (one
    block, its sum and the copy handed over at its end, streaming; every block in memory)."""
    pass_bytes, inputs = _backward(dims, rows, seqlen, batch_size, nbytes, streaming)
    per_block = dims.block_params
    grads = per_block * (2 * 4 + nbytes) if streaming else dims.layers * per_block * (4 + nbytes)
    return pass_bytes + grads, inputs


def _fisher_pass(dims: ModelDims, rows: int, seqlen: int, batch_size: int, nbytes: int, streaming: bool,
                 kfac: bool) -> tuple[int, int]:
    """The fisher/kfac pass: the backward and every block's accumulators with their scaled copies."""
    pass_bytes, inputs = _backward(dims, rows, seqlen, batch_size, nbytes, streaming)
    return pass_bytes + 2 * dims.layers * _fisher_block(dims, kfac), inputs


def _gradient_parts(dims: ModelDims, passes: GradientPasses, seqlen: int, batch_size: int, nbytes: int,
                    streaming: bool) -> dict:
    """The gradient pre-passes' parts of an :class:`Estimate` and the numbers naming the larger pass (they run one
    after the other; a Taylor dict kept in RAM, without a work folder, is still there during the fisher pass)."""
    taylor_all = dims.layers * dims.block_params * 4  # every block's fp32 gradients
    taylor_held = (dims.block_params * 4 if passes.work_folder else taylor_all) if passes.taylor_rows else 0
    candidates = []  # (bytes, of which block inputs, rows, what)
    if passes.taylor_rows:
        candidates.append((*_taylor_pass(dims, passes.taylor_rows, seqlen, batch_size, nbytes, streaming),
                           passes.taylor_rows, "Taylor gradients"))
    if passes.fisher_rows:
        pass_bytes, inputs = _fisher_pass(dims, passes.fisher_rows, seqlen, batch_size, nbytes, streaming,
                                          passes.kfac)
        earlier = 0 if passes.work_folder else taylor_held
        candidates.append((pass_bytes + earlier, inputs, passes.fisher_rows,
                           f"{'kfac' if passes.kfac else 'fisher'} weights"))
    if not candidates:
        return {"parts": {}, "numbers": {}}
    total, inputs, rows, what = max(candidates)
    fisher_all = dims.layers * _fisher_block(dims, passes.kfac) if passes.fisher_rows else 0
    # held by the block loop: the fisher weights and their square roots (kfac: the matrix, its fp32 root and
    # fp64 inverse root), and one block's Taylor gradients (all of them without a work folder)
    fisher_held = fisher_all * (4 if passes.kfac else 2)
    files = ((taylor_all if passes.taylor_rows else 0) + fisher_all) if passes.work_folder else 0
    return {"parts": {"gradient_pass": total, "gradient_inputs": inputs, "gradients_held": taylor_held + fisher_held,
                      "gradient_files": files},
            "numbers": {"gradient_rows": rows, "gradient_for": what}}


def estimate(dims: ModelDims, *, nsamples: int, seqlen: int, batch_size: int, dtype: str, sparsity: float,
             streaming: bool, activations: str, selection: str = "auto",
             gradients: GradientPasses | None = None) -> Estimate:
    """The run's peak memory and its disk use, by part (see the module docstring for what is counted)."""
    nbytes = DTYPE_BYTES[dtype]
    tokens = nsamples * seqlen
    stream = tokens * dims.hidden * nbytes
    moments = 4 * (2 * dims.hidden**2 + (dims.heads * dims.head_dim) ** 2 + dims.intermediate**2)
    selection_bytes = 0 if selection == "score" else SELECTION_MATRICES * 8 * dims.intermediate**2
    embedding = dims.vocab * dims.hidden * nbytes
    resident = embedding if streaming else dims.total_params * nbytes
    numbers = {"nsamples": nsamples, "seqlen": seqlen, "tokens": tokens, "hidden": dims.hidden,
               "intermediate": dims.intermediate, "heads": dims.heads, "layers": dims.layers, "vocab": dims.vocab,
               "dtype_bytes": nbytes, "batch_size": batch_size, "streaming": streaming, "activations": activations,
               "params": dims.total_params}
    grad = _gradient_parts(dims, gradients or GradientPasses(), seqlen, batch_size, nbytes, streaming)
    return Estimate(streams=2 * stream, statistics=moments + selection_bytes, block=2 * dims.block_params * nbytes,
                    attention=min(batch_size, nsamples) * dims.heads * seqlen**2 * 4, ids=tokens * 8,
                    resident_weights=resident, output=int((1 - sparsity) * dims.total_params * nbytes),
                    streams_on_disk=activations == "disk", numbers={**numbers, **grad["numbers"]}, **grad["parts"])


def available_memory() -> int:
    """Bytes of RAM this process may still use: the system's available memory, capped by a cgroup limit."""
    import psutil

    free = psutil.virtual_memory().available
    limit = _cgroup_headroom()
    return min(free, limit) if limit is not None else free


def _cgroup_headroom() -> int | None:
    """``memory.max - memory.current`` of a cgroup v2 limit (containers), None without one."""
    base = Path("/sys/fs/cgroup")
    try:
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(int(limit) - int((base / "memory.current").read_text().strip()), 0)
    except (OSError, ValueError):
        return None


def free_disk(path: str | os.PathLike) -> tuple[Path, int]:
    """The nearest existing folder at or above ``path``, and the bytes free on its filesystem."""
    probe = Path(path).expanduser().absolute()
    while not probe.exists():
        probe = probe.parent
    return probe, shutil.disk_usage(probe).free


def human(n: float) -> str:
    """Bytes for a message: GiB above one GiB, else MiB."""
    return f"{n / GiB:.1f} GiB" if n >= GiB else f"{n / MiB:.1f} MiB"


def check_memory(est: Estimate, available: int, disk_free: int | None = None) -> None:
    """Refuse a run whose estimated peak exceeds ``available``, naming the parts and what would fit.

    ``disk_free``: free bytes where the work folder goes (None: no work folder, so no disk activations).
    """
    if est.ram <= available:
        return
    rest = (f"calibration ids {human(est.ids)}, resident weights {human(est.resident_weights)}, "
            f"runtime {human(est.overhead)}")
    raise ResourceError(f"not enough memory: this run needs about {human(est.ram)} ({_peak(est)}, {rest}) but "
                        f"{human(available)} are available; {_suggestion(est, available, disk_free)}")


def _gradient_peak(est: Estimate) -> bool:
    """Whether the gradient pre-pass, not the block loop, sets the run's peak."""
    return est.gradient_ram > est.pipeline_ram


def _peak(est: Estimate) -> str:
    """The parts of the larger of the two peaks (the gradient pre-pass or the block loop), for the message."""
    n = est.numbers
    if _gradient_peak(est):
        inputs = ""
        if est.gradient_inputs:
            where = "besides, in files," if est.streams_on_disk else "of which"
            inputs = (f" ({where} block inputs of {n['layers']} layers and 2 gradient streams "
                      f"{human(est.gradient_inputs)})")
        return f"a gradient pass over {n['gradient_rows']} rows ({n['gradient_for']}) {human(est.gradient_ram)}{inputs}"
    stream = est.streams // 2
    held = f", gradients and fisher weights held {human(est.gradients_held)}" if est.gradients_held else ""
    return (f"activation streams 2 x {human(stream)} (nsamples {n['nsamples']} x seqlen {n['seqlen']} x hidden "
            f"{n['hidden']} x {n['dtype_bytes']} bytes){' on disk' if est.streams_on_disk else ''}, "
            f"statistics {human(est.statistics)}, one block + its copy {human(est.block)}, "
            f"attention maps {human(est.attention)}{held}")


def _suggestion(est: Estimate, available: int, disk_free: int | None) -> str:
    """What would fit: the streams (and the gradient pass's block inputs) on disk where the disk holds them, else
    fewer samples (or shorter ones)."""
    on_disk = replace(est, streams_on_disk=True)
    if not est.streams_on_disk and on_disk.ram <= available and disk_free is not None \
            and on_disk.work_disk <= disk_free:
        return (f"--activations disk would fit: about {human(on_disk.ram)} of RAM and "
                f"{human(max(est.streams, est.gradient_inputs))} of disk in the work folder ({human(disk_free)} free)")
    if _gradient_peak(est):
        return _gradient_suggestion(est, available)
    n = est.numbers
    per_sample = (0 if est.streams_on_disk else est.streams // n["nsamples"]) + est.ids // n["nsamples"]
    fixed = est.ram - per_sample * n["nsamples"] - est.attention
    if per_sample and fixed < available:
        fits = (available - fixed) // per_sample
        if fits >= 1:
            return f"use --nsamples {min(fits, n['nsamples'] - 1)} or fewer (or a shorter --seqlen)"
    return "use a shorter --seqlen, fewer samples or a machine with more memory"


def _gradient_suggestion(est: Estimate, available: int) -> str:
    """Fewer rows for a streamed pass (its block inputs grow with them); a smaller batch for a whole-model one
    (one batch's graph of every layer)."""
    n = est.numbers
    rows = n["gradient_rows"]
    per_row = 0 if est.streams_on_disk else est.gradient_inputs // rows
    fixed = est.ram - per_row * rows
    if per_row and fixed < available and (available - fixed) // per_row >= 1:
        flag = "--nsamples" if n["gradient_for"] == "Taylor gradients" else "--fisher-nsamples"
        return f"use {flag} {min((available - fixed) // per_row, rows - 1)} or fewer for the gradient pass"
    if not n["streaming"]:
        return ("use a smaller --batch-size (the whole-model backward keeps one batch's activations of every "
                "layer), stream the run, or a machine with more memory")
    return "use a shorter --seqlen, fewer samples or a machine with more memory"


def check_disk(est: Estimate, out: str | os.PathLike, work: str | os.PathLike | None, linked: bool) -> dict:
    """Refuse when the output (and the work folder, on the same or its own filesystem) cannot fit on disk.

    Returns the numbers it used, for the report. The output's size is known up front: the pruned model has
    ``(1 - sparsity)`` of the parameters. ``linked``: the output's block shards are hard links to the work
    folder's (streaming), so on one filesystem they are counted once.
    """
    out_at, out_free = free_disk(Path(out).parent)
    needs: dict[int, int] = {}
    free: dict[int, tuple[Path, int]] = {}
    dev = os.stat(out_at).st_dev
    needs[dev], free[dev] = est.output, (out_at, out_free)
    if work is not None:
        work_at, work_free = free_disk(work)
        wdev = os.stat(work_at).st_dev
        needs[wdev] = needs.get(wdev, 0) + est.work_disk - (est.output if wdev == dev and linked else 0)
        free.setdefault(wdev, (work_at, work_free))
    for d, need in needs.items():
        where, have = free[d]
        if need > have:
            raise ResourceError(f"not enough disk space: the output {out} needs about {human(est.output)} and the "
                                f"work folder about {human(est.work_disk)}, {human(need)} in all on {where}, but "
                                f"only {human(have)} are free; free some space or choose another --out / --work-dir")
    return {"output_free": out_free, "output_at": str(out_at), "needed_per_filesystem": list(needs.values())}
