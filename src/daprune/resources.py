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
  streaming, the whole model in memory otherwise.

It is an estimate of the peak, not a bound: the interpreter and library code (about 0.5 GiB) come on top
and are counted as a fixed overhead. The numbers go into ``report.json`` (``resources``).
"""

from __future__ import annotations

import os
import shutil
from dataclasses import asdict, dataclass, field
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
    numbers: dict = field(default_factory=dict)

    @property
    def ram(self) -> int:
        streams = 0 if self.streams_on_disk else self.streams
        return streams + self.statistics + self.block + self.attention + self.ids + self.resident_weights \
            + self.overhead

    @property
    def work_disk(self) -> int:
        """The work folder: pruned block shards, and the streams (memory-mapped, or one checkpoint of them)."""
        return self.output + self.streams

    def to_dict(self) -> dict:
        return {**asdict(self), "ram": self.ram, "work_disk": self.work_disk}


def estimate(dims: ModelDims, *, nsamples: int, seqlen: int, batch_size: int, dtype: str, sparsity: float,
             streaming: bool, activations: str, selection: str = "auto") -> Estimate:
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
    return Estimate(streams=2 * stream, statistics=moments + selection_bytes, block=2 * dims.block_params * nbytes,
                    attention=min(batch_size, nsamples) * dims.heads * seqlen**2 * 4, ids=tokens * 8,
                    resident_weights=resident, output=int((1 - sparsity) * dims.total_params * nbytes),
                    streams_on_disk=activations == "disk", numbers=numbers)


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
    n = est.numbers
    stream = est.streams // 2
    parts = (f"activation streams 2 x {human(stream)} (nsamples {n['nsamples']} x seqlen {n['seqlen']} x hidden "
             f"{n['hidden']} x {n['dtype_bytes']} bytes){' on disk' if est.streams_on_disk else ''}, "
             f"statistics {human(est.statistics)}, one block + its copy {human(est.block)}, "
             f"attention maps {human(est.attention)}, calibration ids {human(est.ids)}, "
             f"resident weights {human(est.resident_weights)}, runtime {human(est.overhead)}")
    raise ResourceError(f"not enough memory: this run needs about {human(est.ram)} ({parts}) but "
                        f"{human(available)} are available; {_suggestion(est, available, disk_free)}")


def _suggestion(est: Estimate, available: int, disk_free: int | None) -> str:
    """What would fit: the streams on disk (where the disk holds them), else fewer samples (or shorter ones)."""
    n = est.numbers
    without_streams = est.ram - (0 if est.streams_on_disk else est.streams)
    disk_fits = disk_free is not None and est.work_disk <= disk_free
    if not est.streams_on_disk and without_streams <= available and disk_fits:
        return (f"--activations disk would fit: about {human(without_streams)} of RAM and {human(est.streams)} of "
                f"disk in the work folder ({human(disk_free)} free)")
    per_sample = (0 if est.streams_on_disk else est.streams // n["nsamples"]) + est.ids // n["nsamples"]
    fixed = est.ram - per_sample * n["nsamples"] - est.attention
    if per_sample and fixed < available:
        fits = (available - fixed) // per_sample
        if fits >= 1:
            return f"use --nsamples {min(fits, n['nsamples'] - 1)} or fewer (or a shorter --seqlen)"
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
