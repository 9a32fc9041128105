"""ContinuationLogitsHFLM: the same lm-eval answers as plain HFLM, from fewer logits rows."""

from __future__ import annotations

import random

import pytest

pytest.importorskip("lm_eval")
torch = pytest.importorskip("torch")

from conftest import tiny_model  # noqa: E402
from test_io import char_tokenizer  # noqa: E402

from daprune.evaluation.lm_eval_model import (  # noqa: E402
    ContinuationLogitsHFLM,
    continuation_starts,
    logits_to_keep,
)


def _requests(max_length: int, seed: int = 0) -> list[tuple[tuple[str, str], list[int], list[int]]]:
    """Requests shaped like zero-shot ones: shared contexts, one- and multi-token continuations,
    contexts and continuations ending in the pad id 0, and inputs longer than the model's window."""
    rng = random.Random(seed)
    reqs = []
    for doc in range(12):
        ctx = [rng.randrange(1, 96) for _ in range(rng.randrange(10, 60))]
        if doc % 4 == 0:
            ctx[-1] = 0  # a real token that equals lm-eval's pad id
        for choice in range(rng.choice([2, 4])):
            n = 1 if doc % 3 == 0 else rng.randrange(1, 12)
            cont = [rng.randrange(0, 96) for _ in range(n)]
            if choice == 1:
                cont[-1] = 0
            reqs.append(((f"d{doc}", f"c{choice}"), ctx, cont))
    long_ctx = [rng.randrange(1, 96) for _ in range(max_length + 20)]
    reqs.append((("long", "c0"), long_ctx, [5, 6, 7]))
    return reqs


def _lm(model, trim: bool, batch_size: int = 4) -> ContinuationLogitsHFLM:
    return ContinuationLogitsHFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=batch_size,
                                  softmax_dtype="float32", progress=False, trim_logits=trim)


@pytest.mark.parametrize("batch_size", [1, 4, 7])
def test_trimmed_logits_give_plain_hflm_answers(one_thread, batch_size: int) -> None:
    model = tiny_model(vocab=96)
    trimmed, plain = _lm(model, True, batch_size), _lm(model, False, batch_size)
    assert trimmed.trim_logits and not plain.trim_logits
    reqs = _requests(trimmed.max_length)
    ours = trimmed._loglikelihood_tokens(reqs, disable_tqdm=True)
    ref = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in ref]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in ref], abs=1e-5)
    assert plain.positions_computed == plain.positions_total
    assert trimmed.positions_total == plain.positions_total
    # seeded requests: 10% of the rows at batch 1, 54% at 4, 68% at 7 (wider batches pad more)
    assert trimmed.positions_computed < 0.8 * trimmed.positions_total


def test_logits_to_keep_covers_every_row() -> None:
    starts = {(4, 5, 6, 7): 2, (9, 8): 1, (3, 0): 1, (3,): 0}
    batch = torch.tensor([[4, 5, 6, 7], [9, 8, 0, 0]])
    assert logits_to_keep(batch, starts) == 3  # row 1's continuation starts at position 1
    # A row whose last real token is the pad id: (3, 0) and the shorter (3,) both match; the earlier
    # start wins, so the longer reading's continuation is covered too.
    assert logits_to_keep(torch.tensor([[4, 5, 6, 7], [3, 0, 0, 0]]), starts) is None  # all 4 positions
    assert logits_to_keep(torch.tensor([[4, 5, 6, 7]]), starts) == 2
    assert logits_to_keep(torch.tensor([[1, 2, 3]]), starts) is None  # unknown input: compute everything


def test_continuation_starts_follow_lm_evals_truncation() -> None:
    reqs = [(None, [1, 2, 3], [4, 5]), (None, [1, 2, 3, 4], [5]), (None, list(range(1, 11)), [11, 12])]
    starts = continuation_starts(reqs, max_length=6)
    # the first two requests have the same model input; the earlier continuation start is kept
    assert starts[(1, 2, 3, 4)] == 2
    # left-truncated to max_length + 1 tokens, last one dropped: inputs 6..11, continuation from 4
    assert starts == {(1, 2, 3, 4): 2, (6, 7, 8, 9, 10, 11): 4}


def test_models_without_logits_to_keep_fall_back_to_plain_hflm() -> None:
    model = tiny_model(vocab=96)
    original = model.forward

    def forward(input_ids=None, **kwargs):  # no logits_to_keep in the signature
        return original(input_ids=input_ids, **kwargs)

    model.forward = forward
    lm = _lm(model, True)
    assert not lm.trim_logits


@pytest.mark.parametrize("loader", ["daprune", "remote-code"])
def test_saved_non_uniform_model_is_scored_from_trimmed_logits(one_thread, tmp_path, loader: str) -> None:
    """A pruned folder, loaded either way, keeps logits_to_keep, so the saving applies to it."""
    from transformers import AutoModelForCausalLM

    from daprune.loader import load_pruned
    from daprune.models.adapter import get_adapter
    from daprune.output import save_pruned

    model = tiny_model(vocab=96)
    adapter = get_adapter(model)
    adapter.block(2).slice_heads([0, 1, 3, 4])
    adapter.block(3).slice_ffn(range(50))
    out = save_pruned(model, char_tokenizer(), tmp_path / "out", {})
    if loader == "daprune":
        loaded, _ = load_pruned(out)
    else:
        loaded = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True).eval()
        assert type(loaded).__name__ == "DapruneLlamaForCausalLM"
    trimmed, plain = _lm(loaded, True), _lm(loaded, False)
    assert trimmed.trim_logits
    reqs = _requests(trimmed.max_length, seed=1)
    ours = trimmed._loglikelihood_tokens(reqs, disable_tqdm=True)
    ref = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in ref], abs=1e-5)
    assert trimmed.positions_computed < trimmed.positions_total
