"""Half precision on a CPU that has no fast kernels for it is warned about, once, before any work."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import tiny_model

import daprune
from daprune import devices


@pytest.fixture
def cpu(monkeypatch):
    """Pretend to be an x86 CPU with the given capability; the once-per-process memory starts empty."""

    def set_capability(capability: str, machine: str = "x86_64") -> None:
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: capability)
        monkeypatch.setattr(devices.platform, "machine", lambda: machine)

    devices.warn_slow_half_precision.cache_clear()
    yield set_capability
    devices.warn_slow_half_precision.cache_clear()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "torch.bfloat16"])
def test_half_precision_on_an_avx2_cpu_is_slow(cpu, dtype):
    cpu("AVX2")
    reason = devices.slow_half_precision(dtype, "cpu")
    assert reason is not None and "float32" in reason and "AVX2" in reason


@pytest.mark.parametrize(("capability", "machine", "dtype", "device"), [
    ("AVX2", "x86_64", "float32", "cpu"),       # fp32 is the fast path everywhere
    ("AVX512", "x86_64", "bfloat16", "cpu"),    # AVX-512 has bf16 kernels
    ("AVX2", "x86_64", "bfloat16", "meta"),     # not a CPU run
    ("DEFAULT", "aarch64", "bfloat16", "cpu"),  # not x86: nothing known, nothing guessed
])
def test_no_warning_where_half_precision_is_not_known_to_be_slow(cpu, capability, machine, dtype, device):
    cpu(capability, machine)
    assert devices.slow_half_precision(dtype, device) is None


def test_prune_warns_once(cpu, caplog):
    cpu("AVX2")
    with caplog.at_level(logging.WARNING, logger="daprune.devices"):
        for _ in range(2):
            daprune.prune(model=tiny_model(layers=2), calibration="random", nsamples=4, seqlen=16, layers="0:",
                          dtype="bfloat16", progress=False)
    warned = [r for r in caplog.records if r.name == "daprune.devices"]
    assert len(warned) == 1 and "bfloat16" in warned[0].getMessage()


def test_float32_prune_does_not_warn(cpu, caplog):
    cpu("AVX2")
    with caplog.at_level(logging.WARNING, logger="daprune.devices"):
        daprune.prune(model=tiny_model(layers=2), calibration="random", nsamples=4, seqlen=16, layers="0:",
                      progress=False)
    assert not [r for r in caplog.records if r.name == "daprune.devices"]


def test_loading_for_eval_in_half_precision_warns(cpu, caplog, tmp_path):
    from daprune.models.loading import load_model

    cpu("AVX2")
    tiny_model(layers=2).save_pretrained(tmp_path / "m")
    with caplog.at_level(logging.WARNING, logger="daprune.devices"):
        model, _, _ = load_model(str(tmp_path / "m"), dtype="bfloat16", tokenizer_required=False)
    assert model.dtype == torch.bfloat16
    assert [r for r in caplog.records if r.name == "daprune.devices"]
