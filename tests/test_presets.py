"""--preset: a named bundle is exactly its flags typed out, explicit settings win, and the report says which."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import tiny_model
from test_streaming import save_model

from daprune.api import prune
from daprune.cli import main, parse_args
from daprune.config import PruneConfig
from daprune.errors import ConfigError
from daprune.presets import PRESETS
from daprune.report import summary

# the commands the measured rows were run with (docs/quality.md, sessions 22, 29 and 32; README settings table),
# written out by hand: the presets must mean exactly these
QUALITY_FLAGS = ("--calibration coqa+wiki+self --sparsity 0.2 --self-top-p 1 --channel-multiple 1 --nsamples 512 "
                 "--schedule sensitivity --recovery heldout --heldout-nsamples 16 --recovery-target block "
                 "--recovery-inputs --sensitivity-nsamples 8 --logit-scale fit")
DATA_FREE_FLAGS = ("--sparsity 0.2 --calibration self --self-top-p 1 --channel-multiple 1 --nsamples 256 "
                   "--schedule sensitivity --recovery heldout --heldout-nsamples 16 --recovery-target block "
                   "--recovery-inputs")


def _settings(args) -> dict:
    return {k: getattr(args, k) for k in PruneConfig.__dataclass_fields__ if hasattr(args, k) and k != "preset"}


@pytest.mark.parametrize(("name", "flags"), [("quality", QUALITY_FLAGS), ("data-free", DATA_FREE_FLAGS)])
def test_a_preset_is_its_measured_command(name, flags):
    typed = parse_args(["prune", "--out", "o", *flags.split()])
    preset = parse_args(["prune", "--out", "o", "--preset", name])
    assert preset.preset == name and typed.preset is None
    assert _settings(preset) == _settings(typed)
    assert _settings(preset) != _settings(parse_args(["prune", "--out", "o"]))  # it does set something


def test_explicit_flags_win_over_the_preset_and_the_rest_is_the_preset():
    args = parse_args(["prune", "--out", "o", "--nsamples", "64", "--preset", "quality", "--no-recovery-inputs",
                       "--channel-multiple", "16", "--sparsity", "0.3"])
    assert (args.nsamples, args.recovery_inputs, args.channel_multiple, args.sparsity) == (64, False, 16, 0.3)
    assert (args.calibration, args.schedule, args.recovery, args.recovery_target, args.heldout_nsamples,
            args.sensitivity_nsamples) == ("coqa+wiki+self", "sensitivity", "heldout", "block", 16, 8)
    # a flag spelled the other way (--recover is recovery=paper) wins as well
    assert parse_args(["prune", "--out", "o", "--preset", "data-free", "--recover"]).recovery == "paper"


def test_help_lists_each_preset_with_its_flags(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "2000")  # argparse wraps at hyphens ("data-\nfree:"), wherever the text falls
    assert main(["prune", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    for name, preset in PRESETS.items():
        assert f"{name}: " in text and "--calibration " + preset.settings["calibration"] in text
    assert "20%:" in text  # where each was measured, with its percent sign intact


def test_unknown_preset_is_refused_before_anything_runs(tmp_path, capsys):
    assert main(["prune", "--out", str(tmp_path / "o"), "--preset", "fastest"]) == 2
    assert "fastest" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(ConfigError, match="unknown preset 'fastest'; choose from quality, data-free"):
        PruneConfig.from_preset("fastest")


def test_config_from_preset_and_a_name_alone_is_refused():
    cfg = PruneConfig.from_preset("quality", sparsity=0.3, nsamples=64)
    cfg.validate()
    expected = {**dataclasses.asdict(PruneConfig()), **PRESETS["quality"].settings, "sparsity": 0.3, "nsamples": 64,
                "preset": "quality"}
    assert dataclasses.asdict(cfg) == expected
    with pytest.raises(ConfigError, match="none of its settings is in effect"):
        PruneConfig(preset="quality").validate()
    with pytest.raises(ConfigError, match="pass one of them"):
        prune(PruneConfig(), preset="quality")


def test_prune_with_a_preset_equals_the_same_settings_typed_out(tmp_path):
    """The same model, the same tiny overrides: weights identical with and without the preset's name; the report
    records the name and what was set over it."""
    src = save_model(tiny_model(layers=3), tmp_path / "src")
    small = dict(nsamples=8, heldout_nsamples=4, seqlen=16, sensitivity_nsamples=2, batch_size=4, progress=False,
                 cache=str(tmp_path / "cache"), streaming=False)
    named = prune(model=str(src), preset="data-free", **small)
    typed = prune(model=str(src), calibration="self", schedule="sensitivity",
                  recovery="heldout", recovery_target="block", recovery_inputs=True, channel_multiple=1, **small)
    a, b = named.model.state_dict(), typed.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert named.report["params"]["after"] < named.report["params"]["before"]
    s_named, s_typed = dict(named.report["settings"]), dict(typed.report["settings"])
    assert s_named.pop("preset") == "data-free" and s_typed.pop("preset") is None
    assert s_named == s_typed
    assert "preset         data-free (set over it: nsamples 8, heldout_nsamples 4)" in summary(named.report)
    assert "\npreset " not in summary(typed.report)
