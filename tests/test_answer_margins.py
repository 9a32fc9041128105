"""benchmarks/answer_margins.py: per-part accuracy and per-character answer log-likelihoods, against hand sums."""

from __future__ import annotations

import pytest
from conftest import benchmark_module


def _hs(source: str, lls: list[float], choices: list[str], gold: int, acc_norm: float, acc: float) -> dict:
    return {"doc": {"source_id": f"{source}~1", "choices": choices}, "filtered_resps": [[x, False] for x in lls],
            "target": gold, "acc_norm": acc_norm, "acc": acc}


def test_margins_against_hand_computed_values():
    margins = benchmark_module("answer_margins").margins
    samples = {
        "hellaswag": [_hs("wikihow", [-4.0, -6.0, -3.0], ["abcd", "abcdef", "ab"], 0, 1.0, 0.0),
                      _hs("wikihow", [-2.0, -2.0, -9.0], ["ab", "abcd", "abc"], 2, 0.0, 0.0),
                      _hs("activitynet", [-1.0, -5.0], ["a", "abcde"], 1, 1.0, 0.0)],
        "piqa": [{"doc": {"sol1": "xx", "sol2": "yyyy"}, "filtered_resps": [[-4.0, False], [-2.0, False]],
                  "target": 1, "acc": 1.0}],
    }
    got = margins(samples)
    # wikihow: per-char [-1, -1, -1.5] gold 0 -> wrong mean -1.25, margin -1 - (-1) = 0;
    #          per-char [-1, -0.5, -3] gold 2 -> gold -3, wrong mean -0.75, margin -3 - (-0.5) = -2.5
    assert got["wikihow"] == pytest.approx({"acc_norm": 0.5, "acc": 0.0, "gold": -2.0, "wrong": -1.0,
                                            "margin": -1.25, "n": 2})
    assert got["activitynet"] == pytest.approx({"acc_norm": 1.0, "acc": 0.0, "gold": -1.0, "wrong": -1.0,
                                                "margin": 0.0, "n": 1})
    # piqa has no acc_norm in the sample: acc stands in; per-char [-2, -0.5], gold 1
    assert got["piqa"] == pytest.approx({"acc_norm": 1.0, "acc": 1.0, "gold": -0.5, "wrong": -2.0, "margin": 1.5,
                                         "n": 1})


def test_register_probe_nll_equals_cross_entropy():
    """register_probe.nll: the mean NLL per token of whole texts, and of the endings from the context's last token,
    against torch's cross-entropy on the same ids."""
    import torch
    import torch.nn.functional as F
    from conftest import tiny_model
    from test_streaming import word_tokenizer

    nll = benchmark_module("register_probe").nll
    model, tok = tiny_model(layers=2), word_tokenizer(128)
    pairs = [("w5 w6 w7", " w8 w9"), ("", "w10 w11 w12 w13")]
    got = nll(model, tok, pairs)
    losses, ends = [], []
    with torch.no_grad():
        for ids, start in (([5, 6, 7, 8, 9], 3), ([10, 11, 12, 13], 0)):
            x = torch.tensor([ids])
            loss = F.cross_entropy(model(x).logits[0, :-1], x[0, 1:], reduction="none")
            losses.append(loss)
            ends.append(loss[max(start, 1) - 1:])
    assert got["all"] == pytest.approx(torch.cat(losses).mean().item(), rel=1e-5)
    assert got["ending"] == pytest.approx(torch.cat(ends).mean().item(), rel=1e-5)
