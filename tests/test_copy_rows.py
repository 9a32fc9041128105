"""``--copy-rows``: which rows repeat themselves, how, and that the prune reads exactly those rows."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import CharTokenizer, tiny_model

from daprune.api import _Run, prune
from daprune.checkpoint import ids_digest
from daprune.config import PruneConfig
from daprune.data.copy_rows import chosen_rows, copy_halves
from daprune.errors import ConfigError

FAST = dict(calibration="random", nsamples=16, seqlen=24, sparsity=0.3, progress=False, layers="0:")


@pytest.mark.parametrize(("nrows", "fraction", "want"), [
    (12, 0.25, [3, 7, 11]), (10, 1 / 3, [2, 5, 8]), (5, 1.0, [0, 1, 2, 3, 4]), (5, 0.0, []), (4, 0.5, [1, 3]),
])
def test_chosen_rows_are_evenly_spread(nrows, fraction, want):
    assert chosen_rows(nrows, fraction) == want


def test_a_chosen_row_repeats_its_first_half_after_a_bos_and_the_others_are_untouched():
    ids = torch.arange(100, 136).reshape(4, 9)  # odd length: the second part is one token longer than the first
    ids[2, 0] = 7  # row 2 starts with the BOS
    got, info = copy_halves(ids, 0.5, bos_token_id=7)  # rows 1 and 3
    assert torch.equal(got[[0, 2]], ids[[0, 2]])
    assert got[1].tolist() == [109, 110, 111, 112, 109, 110, 111, 112, 113]  # first 4, then the same from 109 on
    assert got[3].tolist() == [127, 128, 129, 130, 127, 128, 129, 130, 131]
    bos_row, _ = copy_halves(ids[2:3], 1.0, bos_token_id=7)
    assert bos_row[0].tolist() == [7, 119, 120, 121, 119, 120, 121, 122, 123]  # the BOS is not repeated
    assert info["rows"] == 2 and info["of"] == 4


def test_bad_fractions_and_short_rows_are_refused_by_the_config():
    for bad in (-0.1, 1.5):
        with pytest.raises(ConfigError, match="copy-rows"):
            PruneConfig(copy_rows=bad).validate()
    with pytest.raises(ConfigError, match="at least 4 tokens"):
        PruneConfig(copy_rows=0.5, seqlen=3).validate()
    PruneConfig(copy_rows=0.5, seqlen=4).validate()


def test_the_prune_reads_the_copied_rows_and_reports_them(monkeypatch):
    """Every row the run reads (scoring and held-out) is the run without the setting with rows 3, 7, 11, ... made
    copies; its report's digest is that of those rows; and the pruned model differs."""
    seen: list[torch.Tensor] = []
    original = _Run.calibration

    def record(self):
        ids = original(self)
        seen.append(ids.clone())
        return ids

    monkeypatch.setattr(_Run, "calibration", record)
    model, tok = tiny_model(layers=3, seed=2), CharTokenizer()
    plain = prune(model=copy.deepcopy(model), tokenizer=tok, **FAST, heldout_nsamples=8)
    copied = prune(model=copy.deepcopy(model), tokenizer=tok, **FAST, heldout_nsamples=8, copy_rows=0.25)
    base, got = seen
    assert base.shape == got.shape == (24, 24)
    want = base.clone()
    for r in range(3, 24, 4):
        want[r, 12:] = base[r, :12]  # random tokens: no BOS
    assert torch.equal(got, want)
    info = copied.report["calibration"]
    assert info["copy_rows"]["rows"] == 6 and "copy_rows" not in plain.report["calibration"]
    assert info["ids_sha256"] == ids_digest(got) != plain.report["calibration"]["ids_sha256"]
    a, b = plain.model.state_dict(), copied.model.state_dict()
    assert any(not torch.equal(a[k], b[k]) for k in a)
    assert copied.report["settings"]["copy_rows"] == 0.25



def test_copy_probe_scores_the_second_copy_by_cross_entropy():
    """benchmarks/copy_probe.py: its per-token NLL is torch's cross-entropy of the next token, and its copy measure
    averages the targets from SEGMENT on, which a perfect copier predicts from the first copy."""
    import torch.nn.functional as F
    from conftest import benchmark_module

    probe = benchmark_module("copy_probe")
    model = tiny_model(layers=2, seed=4)
    rows = torch.randint(3, 128, (3, 2 * probe.SEGMENT), generator=torch.Generator().manual_seed(5))
    got = probe.nll_rows(model, rows, batch_size=2)
    with torch.no_grad():
        logits = model(rows).logits[:, :-1]
    want = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), rows[:, 1:].reshape(-1), reduction="none")
    torch.testing.assert_close(got, want.reshape(3, -1).double(), rtol=1e-5, atol=1e-5)
    per_target = torch.zeros(3, 2 * probe.SEGMENT - 1, dtype=torch.double)
    per_target[:, probe.SEGMENT:] = 1.0  # the targets that are tokens 65.. of the row: the second copy after its first
    assert probe.second_copy_nll(per_target) == 1.0
