"""Settings that only some runs read are refused where nothing would read them (--obs-damp, --tau,
--unrouted-experts), and change the result where something does."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_model

from daprune.api import prune
from daprune.errors import ConfigError

pytestmark = pytest.mark.usefixtures("one_thread")

# tiny_model: FFN width 96, so OBS under --selection auto needs 4 x 96 = 384 calibration tokens (config.py)
BASE = dict(calibration="random", sparsity=0.2, layers="1:-1", progress=False)
FEW = dict(nsamples=4, seqlen=32)  # 128 tokens (>= the hidden size 48): greedy selection in every block
ENOUGH = dict(nsamples=32, seqlen=16)  # 512 tokens: OBS in every block


@pytest.mark.parametrize("extra,needle", [
    ({**FEW}, "fewer than that for every pruned block"),
    ({**ENOUGH, "selection": "score"}, "--selection score uses no OBS"),
    ({**ENOUGH, "selection": "greedy"}, "--selection greedy uses no OBS"),
    ({**ENOUGH, "ffn_criterion": "l1"}, "--ffn-criterion l1 chooses the channels by its own score, without OBS"),
])
def test_unused_damping_is_refused(extra, needle):
    with pytest.raises(ConfigError, match=needle):
        prune(model=tiny_model(), **BASE, **extra, obs_damp=0.5)


def _weights(**extra) -> dict[str, torch.Tensor]:
    res = prune(model=tiny_model(), **BASE, **extra)
    return {k: v.clone() for k, v in res.model.state_dict().items()}


@pytest.mark.parametrize("extra", [ENOUGH, {**FEW, "selection": "obs"}, {**FEW, "compensate_heads": True}])
def test_used_damping_changes_the_weights(extra):
    """Where OBS runs (enough tokens, forced OBS, or the head compensation), two dampings give other weights."""
    a, b = _weights(**extra, obs_damp=1e-4), _weights(**extra, obs_damp=10.0)
    assert a.keys() == b.keys()
    changed = [k for k in a if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    assert changed, "obs_damp was accepted but changed no weight"


def test_default_damping_needs_no_obs():
    """The default value is never refused: it is what a run without the flag has."""
    prune(model=tiny_model(), **BASE, **FEW)


def test_tau_only_with_the_similarity_criterion():
    """--tau judges heads only under --head-criterion similarity: elsewhere refused; there it changes which heads
    count as redundant (a threshold above every divergence makes all heads of a block one redundant group)."""
    from daprune.config import PruneConfig

    with pytest.raises(ConfigError, match="--head-criterion l1 no head is judged by it"):
        PruneConfig(head_criterion="l1", tau=0.1).validate()
    low = prune(model=tiny_model(), **BASE, **FEW, tau=0.0)
    high = prune(model=tiny_model(), **BASE, **FEW, tau=1e6)
    redundant = [[r.get("redundant_heads") for r in res.report["layers"] if r["pruned"]] for res in (low, high)]
    assert all(not r for r in redundant[0]) and all(r for r in redundant[1])


def test_unrouted_experts_refused_on_a_model_without_experts():
    with pytest.raises(ConfigError, match="has no experts in the pruned blocks"):
        prune(model=tiny_model(), **BASE, **FEW, unrouted_experts="keep")


def test_compare_tau_reaches_only_similarity_rows():
    from daprune.config import TAU, PruneConfig
    from daprune.evaluation.compare import row_config, select_rows

    base = PruneConfig(tau=0.2)
    configs = {r.key: row_config(r, base) for r in select_rows(None) if r.key != "dense"}
    assert {k: c.tau for k, c in configs.items() if c.head_criterion == "similarity"}  # some ours row keeps it
    for key, cfg in configs.items():
        assert cfg.tau == (0.2 if cfg.head_criterion == "similarity" else TAU), key
        cfg.validate()


@pytest.mark.parametrize("kw,needle", [
    (dict(head_criterion="none", kv_groups=True), "--kv-groups acts on the heads a block loses, and --head-crit"),
    (dict(head_criterion="none", compensate_heads=True), "--compensate-heads acts on the heads a block loses"),
    (dict(schedule="adaptive", head_split="paper"), "--head-split paper would be ignored"),
    (dict(schedule="adaptive", kv_groups=True), "--kv-groups would be ignored"),
])
def test_head_settings_nothing_reads_are_refused(kw, needle):
    from daprune.config import PruneConfig

    with pytest.raises(ConfigError, match=needle):
        PruneConfig(**kw).validate()


def test_ffn_only_removes_heads_where_the_ffn_cannot_meet_the_share():
    """Why --head-split ffn-only does not refuse head settings: its first feasible split may remove heads. The tiny
    model's FFN is 69% of a block; at a 78% share per block heads must go, and --compensate-heads is then applied."""
    kw = dict(BASE, **FEW, sparsity=0.78, layers="0:", head_split="ffn-only", sparsity_basis="blocks",
              channel_multiple=1)
    plain, compensated = (prune(model=tiny_model(), **kw, compensate_heads=on) for on in (False, True))
    heads = [r["kept_heads"] for r in plain.report["layers"] if r["pruned"]]
    assert any(len(h) < 6 for h in heads), heads
    a, b = plain.model.state_dict(), compensated.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a if "o_proj" in k)


def test_kv_groups_refused_on_multi_head_attention(monkeypatch):
    """With one query head per KV head every removed head is a whole group already: --kv-groups changes nothing
    (checked with the refusal switched off, at sizes where heads go), so it is refused."""
    mha = dict(heads=6, kv=6)
    kw = dict(BASE, **FEW, sparsity=0.6, layers="0:", channel_multiple=1, sparsity_basis="blocks")
    with pytest.raises(ConfigError, match="--kv-groups lets GQA blocks drop whole KV groups"):
        prune(model=tiny_model(**mha), **kw, kv_groups=True)
    import daprune.fit_checks

    monkeypatch.setattr(daprune.fit_checks, "check_criteria_fit", lambda adapter, cfg: None)
    for split in ("auto", "paper"):
        plain = prune(model=tiny_model(**mha), **kw, head_split=split)
        grouped = prune(model=tiny_model(**mha), **kw, head_split=split, kv_groups=True)
        assert any(len(r["kept_heads"]) < 6 for r in plain.report["layers"] if r["pruned"])
        a, b = plain.model.state_dict(), grouped.model.state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("family", ["phi3", "gpt2", "gpt_neox", "opt"])
def test_width_checks_read_native_blocks(family):
    """The checks read head groups and FFN widths of blocks still in native form (Phi-3's fused qkv, GPT-2's
    Conv1D): Phi-3 is GQA, so --kv-groups is read there; the multi-head families refuse it with the message, not
    a traceback; --obs-damp with too few tokens is refused alike."""
    from test_families_extra import tiny as tiny_family

    kw = dict(BASE, **FEW, layers="1:-1")
    if family == "phi3":
        prune(model=tiny_family(family), **kw, kv_groups=True)
    else:
        with pytest.raises(ConfigError, match="--kv-groups lets GQA blocks drop whole KV groups"):
            prune(model=tiny_family(family), **kw, kv_groups=True)
    with pytest.raises(ConfigError, match="fewer than that for every pruned block"):
        prune(model=tiny_family(family), **kw, obs_damp=0.5)


@pytest.mark.parametrize("family", ["phi3", "gpt2"])
def test_fit_checks_leave_native_blocks_as_they_were(family):
    """The checks read widths in canonical form and put each block back: module types and every tensor unchanged."""
    from test_families_extra import tiny as tiny_family

    from daprune.config import PruneConfig
    from daprune.fit_checks import check_criteria_fit
    from daprune.models.adapter import get_adapter

    model = tiny_family(family)
    before_types = {n: type(m) for n, m in model.named_modules()}
    before = {k: v.clone() for k, v in model.state_dict().items()}
    cfg = PruneConfig(sparsity=0.2, layers="1:-1", kv_groups=family == "phi3", obs_damp=0.5, nsamples=512, seqlen=8)
    check_criteria_fit(get_adapter(model), cfg)
    assert {n: type(m) for n, m in model.named_modules()} == before_types
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_gpt2_with_recovery_prunes():
    """The recovery-overfit warning reads the widest FFN from canonical blocks (GPT-2's native Conv1D has no
    in_features; this raised before): the warning is given, and the prune finishes."""
    import logging

    from test_families_extra import tiny as tiny_family

    logger = logging.getLogger("daprune.pipeline")
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append
    logger.addHandler(handler)
    try:
        res = prune(model=tiny_family("gpt2"), **BASE, **FEW, recovery="paper")
    finally:
        logger.removeHandler(handler)
    assert res.report["params"]["after"] < res.report["params"]["before"]
    assert any("least-squares problems on only 128 calibration tokens" in r.getMessage() for r in records)
