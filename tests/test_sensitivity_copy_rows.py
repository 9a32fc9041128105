"""``--sensitivity-copy-rows``: rows that repeat their first half, read by the allocation's KL and by nothing else."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch
from conftest import CharTokenizer
from test_families import tiny as tiny_llama_like
from test_families_extra import tiny as tiny_other

import daprune
from daprune.allocation import KL_POSITIONS_STRIDE, sensitivity_targets
from daprune.config import PruneConfig
from daprune.criteria.base import get_criterion
from daprune.errors import ConfigError
from daprune.models.adapter import get_adapter
from daprune.pipeline import BlockPruner
from daprune.stores import ResidentStore

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = 24


def _by_hand(rows: torch.Tensor) -> torch.Tensor:
    """Each row's first SEQ // 2 tokens, twice (the rows here start with no BOS)."""
    half = rows[:, : SEQ // 2]
    return torch.cat([half, half], dim=1)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
@torch.no_grad()
def test_each_kl_is_the_whole_models_over_the_kl_rows_and_the_copies(family, monkeypatch):
    """Every (block, size) point: KL(dense || model with that trial block swapped in) over the natural KL rows and
    the copy rows together, both from full forwards of the model on the token ids (gpt2: learned positions, so a
    copy made after the embedding would be wrong)."""
    model = tiny_llama_like(family) if family == "llama" else tiny_other(family)
    adapter = get_adapter(model)
    for i in range(adapter.n_layers):
        adapter.block(i).to_canonical()
    cfg = PruneConfig(sparsity=0.2, channel_multiple=1, batch_size=4)
    n, ns, k = 8, 3, 2
    ids = torch.randint(3, 128, (n, SEQ), generator=torch.Generator().manual_seed(3))
    copies = _by_hand(ids[ns : ns + k])
    store = ResidentStore(adapter)
    blocks = range(1, adapter.n_layers)
    pruner = BlockPruner(cfg, get_criterion(cfg.ffn_criterion), get_criterion("second-moment"), 0.0)
    pruner.n_score = pruner.n_fit = n
    pruner.ntokens = n * SEQ
    made = []
    real_trial = BlockPruner.trial_block

    def keep(self, block, heads, removed, stats, rows=None):
        trial = real_trial(self, block, heads, removed, stats, rows)
        made.append((block.index, trial))
        return trial

    monkeypatch.setattr(BlockPruner, "trial_block", keep)
    budget = 0.15 * sum(p.numel() for i in blocks for p in adapter.block(i).layer.parameters())
    _, entry = sensitivity_targets(adapter, pruner, store.embed(ids, 4), store.layer_inputs(SEQ), blocks, budget, ns,
                                   kl_extra=store.embed(copies, 4))
    assert entry["copy_rows"] == k and entry["nsamples"] == ns
    for i in range(adapter.n_layers):
        adapter.block(i).to_native()
    kl_ids = torch.cat([ids[:ns], copies])
    dense = torch.log_softmax(model(input_ids=kl_ids, use_cache=False).logits[:, ::KL_POSITIONS_STRIDE], -1)
    seen = {i: 0 for i in blocks}
    assert len(made) > len(blocks)
    for i, trial in made:
        trial.to_native()
        swapped = copy.deepcopy(model)
        get_adapter(swapped).layers()[i] = trial.layer
        lp = torch.log_softmax(swapped(input_ids=kl_ids, use_cache=False).logits[:, ::KL_POSITIONS_STRIDE], -1)
        want = torch.nn.functional.kl_div(lp, dense, log_target=True, reduction="none").sum(-1).mean()
        got = entry["curves"][str(i)]["kl"][seen[i]]
        assert math.isclose(got, float(want), rel_tol=1e-3, abs_tol=1e-7), (i, got, float(want))
        seen[i] += 1


def _prune(**kw):
    settings = dict(sparsity=0.25, calibration="random", nsamples=8, seqlen=SEQ, batch_size=4, progress=False,
                    channel_multiple=1, schedule="sensitivity", sensitivity_nsamples=3)
    settings.update(kw)
    return daprune.prune(model=tiny_llama_like("llama", layers=6), tokenizer=CharTokenizer(), **settings)


def test_the_copies_move_the_allocation_and_nothing_else(tmp_path):
    """With copy rows the measured curves change (a setting changes what it claims to); a run without them given
    that allocation (``--allocation-from``) writes the same weights bit for bit: no statistic, score or fit read
    the copies."""
    plain = _prune().report["allocation"]
    with_copies = _prune(sensitivity_copy_rows=2, out=str(tmp_path / "c"))
    alloc = with_copies.report["allocation"]
    assert alloc["copy_rows"] == 2 and plain["copy_rows"] == 0
    assert with_copies.report["settings"]["sensitivity_copy_rows"] == 2
    assert alloc["curves"] != plain["curves"]
    reused = _prune(allocation_from=str(tmp_path / "c"))
    assert reused.report["allocation"]["targets"] == alloc["targets"]
    a, b = with_copies.model.state_dict(), reused.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[key], b[key]) for key in a)
    assert json.loads((tmp_path / "c" / "report.json").read_text())["allocation"]["copy_rows"] == 2
    # reusing an allocation may state how it was measured, not another way
    assert _prune(allocation_from=str(tmp_path / "c"), sensitivity_copy_rows=2).report["allocation"]["targets"] == \
        alloc["targets"]
    with pytest.raises(ConfigError, match="measured otherwise"):
        _prune(allocation_from=str(tmp_path / "c"), sensitivity_copy_rows=1)


@pytest.mark.parametrize(("settings", "message"), [
    ({"schedule": "uniform"}, "needs --schedule sensitivity"),
    ({"allocation_search": 2}, "allocation-search"),
    ({"nsamples": 5}, "--nsamples must be at least 6"),
    ({"sensitivity_copy_rows": -1}, ">= 0"),
    ({"seqlen": 3}, "at least 4 tokens"),
])
def test_settings_it_cannot_honour_are_refused(settings, message):
    base = dict(schedule="sensitivity", sensitivity_copy_rows=2, nsamples=16)  # 4 KL rows by default
    with pytest.raises(ConfigError, match=message):
        PruneConfig(**{**base, **settings}).validate()
