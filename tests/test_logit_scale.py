"""--logit-scale fit: one scale on the logits, fitted by KL to the dense model and written into the final norm.

Checked against independent computations: the written parameters multiply the whole model's logits by the scale
(every family's own forward), the KL is torch's own kl_div, the fitted scale is the least of a brute-force curve, and
end to end only the final norm changes, by the reported scale, bit for bit the same streamed or in memory.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import CharTokenizer, tiny_model
from test_families import tiny as tiny_family
from test_families_extra import tiny as tiny_extra
from test_streaming import save_model

from daprune.api import prune
from daprune.config import PruneConfig
from daprune.errors import ConfigError
from daprune.logit_scale import KL_POSITIONS_STRIDE, apply_tensors, fit_scale, mean_kl, scaled_tensors
from daprune.models.adapter import get_adapter

pytestmark = pytest.mark.usefixtures("one_thread")

IDS = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(2))
FAST = dict(calibration="random", nsamples=16, seqlen=24, sparsity=0.3, progress=False, layers="0:")


def _pre_cap(model, logits: torch.Tensor) -> torch.Tensor:
    """The LM head's output from the model's final logits, undoing soft-capping and logit scaling by hand."""
    cap = getattr(model.config, "final_logit_softcapping", None)
    z = torch.atanh(logits.double() / cap) * cap if cap else logits.double()
    return z * getattr(model.config, "logits_scaling", 1.0) if getattr(model.config, "logits_scaling", None) else z


MODELS = {
    "llama": lambda: tiny_family("llama"),
    "gemma3_text": lambda: tiny_family("gemma3_text"),  # (1 + w) gain and a soft-cap
    "gemma2": lambda: tiny_family("gemma2"),
    "granite": lambda: tiny_family("granite"),  # logits divided by a config scale
    "gpt2": lambda: tiny_extra("gpt2"),  # LayerNorm with a bias
    "opt": lambda: tiny_extra("opt"),
    "phi3": lambda: tiny_extra("phi3"),
    "gpt_neox": lambda: tiny_extra("gpt_neox"),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_written_tensors_multiply_the_models_own_logits_by_the_scale(name):
    model = MODELS[name]()
    with torch.no_grad():
        before = _pre_cap(model, model(IDS).logits)
        tensors = scaled_tensors(get_adapter(model), 1.37)
        assert tensors  # the final norm (or projection) at least
        untouched = {k: v.clone() for k, v in model.state_dict().items()}
        apply_tensors(model, tensors)
        after = _pre_cap(model, model(IDS).logits)
    torch.testing.assert_close(after, 1.37 * before, rtol=2e-4, atol=2e-4)
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, untouched[k])}
    assert changed == set(tensors)


def test_a_final_norm_of_another_form_is_refused():
    model = tiny_model(layers=2)
    adapter = get_adapter(model)
    adapter.final_norm = lambda: torch.nn.LayerNorm(48, elementwise_affine=False)  # no gain to carry a scale
    with pytest.raises(ConfigError, match="logit-scale"):
        scaled_tensors(adapter, 1.2)


def _last_layer_input(model, ids):
    """The last decoder layer's output before the final norm (transformers' last hidden state is after it)."""
    got = {}
    layer = get_adapter(model).layers()[-1]
    h = layer.register_forward_hook(lambda m, i, o: got.setdefault("h", o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        model(ids)
    h.remove()
    return got["h"]


def _pair(seed: int = 0):
    """A dense model with a peaked output distribution (a random one is near uniform, and anything far from it would
    be best served by a scale near 0) and its last-layer states, with those of a copy whose MLPs carry noise as large as
    their weights (its best scale is near 0.75)."""
    model = tiny_family("llama", seed=seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(10)
    pruned = copy.deepcopy(model)
    with torch.no_grad():
        for n, p in pruned.named_parameters():
            if "mlp" in n:
                p.add_(p.std() * torch.randn(p.shape, generator=torch.Generator().manual_seed(seed + 3)))
    ids = torch.randint(3, 128, (8, 16), generator=torch.Generator().manual_seed(seed + 9))
    return model, _last_layer_input(pruned, ids), _last_layer_input(model, ids)


def test_mean_kl_is_torchs_kl_divergence_at_the_strided_positions():
    model, hp, hd = _pair()
    adapter = get_adapter(model)
    got = mean_kl(adapter, hp, hd, [1.0, 0.8], batch_size=3)
    with torch.no_grad():
        lp = model.lm_head(model.model.norm(hp))[:, ::KL_POSITIONS_STRIDE].reshape(-1, 128).double()
        ld = model.lm_head(model.model.norm(hd))[:, ::KL_POSITIONS_STRIDE].reshape(-1, 128).double()
    for s, value in zip([1.0, 0.8], got, strict=True):
        want = F.kl_div(F.log_softmax(s * lp, -1), F.log_softmax(ld, -1), log_target=True, reduction="batchmean")
        assert value == pytest.approx(float(want), rel=1e-4)


def test_fitted_scale_is_the_least_of_a_brute_force_curve():
    model, hp, hd = _pair()
    adapter = get_adapter(model)
    scale, tried = fit_scale(adapter, hp, hd, batch_size=4)
    grid = [8 ** (k / 600 - 1) for k in range(1201)]  # [1/8, 8] in steps of 0.35%, independently of the zoom
    curve = mean_kl(adapter, hp, hd, grid, batch_size=8)
    best = grid[min(range(len(grid)), key=curve.__getitem__)]
    assert abs(math.log(scale / best)) < 0.006
    assert tried[f"{scale:g}"] <= min(curve) * (1 + 1e-4)
    assert "1" in tried  # the unscaled model is always a candidate
    assert 1 / 8 < best < 8 and abs(math.log(best)) > 0.05  # an inner optimum away from 1: the search is tested


def test_a_known_temperature_is_recovered():
    """A 'pruned' stream whose logits are the dense ones divided by 1.3 (its hidden states after the norm are
    scaled, which the head sees as they are when the norm is the identity): the fit must undo it."""
    model, _, hd = _pair()
    adapter = get_adapter(model)
    with torch.no_grad():
        model.model.norm = torch.nn.Identity()
    scale, tried = fit_scale(adapter, hd / 1.3, hd, batch_size=4)
    assert scale == pytest.approx(1.3, rel=0.01)
    assert tried[f"{scale:g}"] < 0.01 * tried["1"]


def test_end_to_end_only_the_final_norm_changes_by_the_reported_scale(tmp_path):
    model = tiny_model(layers=4, seed=1)
    tok = CharTokenizer()
    base = prune(model=copy.deepcopy(model), tokenizer=tok, **FAST, heldout_nsamples=8)
    fit = prune(model=copy.deepcopy(model), tokenizer=tok, **FAST, heldout_nsamples=8, logit_scale="fit")
    entry = fit.report["logit_scale"]
    assert base.report["logit_scale"] is None
    assert entry["fitted"] in {float(k) for k in entry["kl_fit"]}
    a, b = base.model.state_dict(), fit.model.state_dict()
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    if entry["scale"] == 1.0:  # fitted at 1, or the held-out rows refused it
        assert not changed
        assert entry["fitted"] == 1.0 or entry["kl_heldout"][f"{entry['fitted']:g}"] >= entry["kl_heldout"]["1"]
    else:
        assert changed == {"model.norm.weight"}
        torch.testing.assert_close(b["model.norm.weight"], a["model.norm.weight"] * entry["scale"])
        assert entry["kl_heldout"][f"{entry['scale']:g}"] < entry["kl_heldout"]["1"]
    assert fit.report["settings"]["logit_scale"] == "fit"


def test_the_scale_lowers_the_kl_on_rows_it_never_saw():
    """Random tokens calibrate; fresh random rows (another seed) judge: the pruned model with the fitted scale is
    closer to the dense one there than without it."""
    model = tiny_model(layers=4, seed=2)
    tok = CharTokenizer()
    base = prune(model=copy.deepcopy(model), tokenizer=tok, **FAST)
    fit = prune(model=copy.deepcopy(model), tokenizer=tok, **FAST, logit_scale="fit")
    assert fit.report["logit_scale"]["scale"] != 1.0
    fresh = torch.randint(0, 128, (16, 24), generator=torch.Generator().manual_seed(77))
    with torch.no_grad():
        ld = F.log_softmax(model(fresh).logits.double(), -1)
        kls = [F.kl_div(F.log_softmax(m.model(fresh).logits.double(), -1), ld, log_target=True,
                        reduction="sum").item() for m in (base, fit)]
    assert kls[1] < kls[0]


def test_streamed_and_in_memory_write_the_same_scaled_model(tmp_path):
    from daprune.loader import load_pruned

    src = save_model(tiny_model(layers=4, seed=4, tie=True), tmp_path / "src")
    settings = dict(FAST, calibration="random", heldout_nsamples=4, logit_scale="fit")
    a = prune(model=str(src), out=str(tmp_path / "stream"), **settings)
    b = prune(model=str(src), out=str(tmp_path / "mem"), streaming=False, **settings)
    assert a.report["execution"]["streaming"] and a.report["logit_scale"] == b.report["logit_scale"]
    wa, wb = load_pruned(tmp_path / "stream")[0].state_dict(), load_pruned(tmp_path / "mem")[0].state_dict()
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    dense = load_pruned(src)[0].state_dict()
    scale = a.report["logit_scale"]["scale"]
    torch.testing.assert_close(wa["model.norm.weight"], dense["model.norm.weight"] * scale)


def test_bad_value_is_refused_and_an_unscalable_norm_before_calibration(monkeypatch):
    with pytest.raises(ConfigError, match="logit-scale"):
        PruneConfig(logit_scale="yes").validate()
    with pytest.raises(ConfigError, match="sparsity 0"):
        PruneConfig(logit_scale="fit", sparsity=0.0).validate()
    from daprune import api
    from daprune.models.adapter import ModelAdapter

    monkeypatch.setattr(ModelAdapter, "final_norm", lambda self: None)
    monkeypatch.setattr(api._Run, "calibration", lambda self: pytest.fail("calibrated before refusing"))
    with pytest.raises(ConfigError, match="logit-scale"):
        prune(model=tiny_model(layers=2), tokenizer=CharTokenizer(), **FAST, logit_scale="fit")


def test_fitted_after_the_prune_equals_fitted_in_it(tmp_path, monkeypatch):
    """benchmarks/logit_scale_after.py rebuilds a finished prune's rows from its report and fits there: the same entry
    as the pipeline's own fit on the same prune, and the same written model."""
    from conftest import benchmark_module

    from daprune.loader import load_pruned
    from daprune.models.loading import load_model

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    after = benchmark_module("logit_scale_after")
    src = save_model(tiny_model(layers=4, seed=5), tmp_path / "src")
    settings = dict(FAST, heldout_nsamples=4)
    prune(model=str(src), out=str(tmp_path / "plain"), **settings)
    fit = prune(model=str(src), out=str(tmp_path / "fit"), **settings, logit_scale="fit")
    dense, tok, source = load_model(str(src))
    report = json.loads((tmp_path / "plain" / "report.json").read_text())
    model, entry = after.fit_after(tmp_path / "plain", report, dense, tok, source, None, None)
    assert entry["scale"] != 1.0
    assert entry["fitted"] == fit.report["logit_scale"]["fitted"]
    for kind in ("kl_fit", "kl_heldout"):
        assert entry[kind].keys() == fit.report["logit_scale"][kind].keys()
        for k, v in entry[kind].items():
            assert v == pytest.approx(fit.report["logit_scale"][kind][k], rel=1e-2)  # fp32 KLs near 1e-4
    written = load_pruned(tmp_path / "fit")[0].state_dict()
    assert all(torch.allclose(v, written[k], rtol=1e-6, atol=1e-7) for k, v in model.state_dict().items())
