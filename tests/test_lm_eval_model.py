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


def _lm(model, trim: bool, batch_size: int = 4, share: bool = False) -> ContinuationLogitsHFLM:
    return ContinuationLogitsHFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=batch_size,
                                  softmax_dtype="float32", progress=False, trim_logits=trim, share_contexts=share)


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
    """A pruned folder, loaded either way, keeps logits_to_keep and takes packed questions, so both savings
    apply to it."""
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
    shared = _lm(loaded, True, share=True)  # and its questions packed, each run once for all its answers
    packed = shared._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert shared.share_contexts and shared.tokens_run < 0.8 * trimmed.tokens_run
    assert [ll for ll, _ in packed] == pytest.approx([ll for ll, _ in ref], abs=1e-4)
    assert [g for _, g in packed] == [g for _, g in ref]


# -- shared contexts: every answer of a question in one packed sequence ---------------------------------------------
class _Recorder:
    """Stands in for lm-eval's request-cache hook: records what would be committed."""

    def __init__(self) -> None:
        self.added: dict = {}

    def add_partial(self, kind: str, key, value) -> None:
        self.added[key] = value


def test_pack_lays_out_the_context_once_and_each_ending_after_it() -> None:
    """Expected tensors written out by hand for one context [1, 2, 3] with endings (4, 5, 6), (7,), (8, 9)."""
    from daprune.evaluation.shared_context import Group, pack

    g = Group((1, 2, 3), (0, 1, 2), ((4, 5, 6), (7,), (8, 9)))
    short = Group((1, 2), (3,), ((5,),))
    batch = pack([g, short])
    assert g.length == 6 and g.needs_mask and not short.needs_mask
    assert not Group((1,), (0, 1), ((2, 3), (4,))).needs_mask  # one ending with inputs: a plain sequence
    assert batch.input_ids.tolist() == [[1, 2, 3, 4, 5, 8], [1, 2, 0, 0, 0, 0]]
    assert batch.position_ids.tolist() == [[0, 1, 2, 3, 4, 3], [0, 1, 0, 0, 0, 0]]
    want = [[1, 0, 0, 0, 0, 0],  # context: causal
            [1, 1, 0, 0, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [1, 1, 1, 1, 0, 0],  # ending 1, token 4: the context and itself
            [1, 1, 1, 1, 1, 0],  # token 5: the context, 4 and itself
            [1, 1, 1, 0, 0, 1]]  # ending 3, token 8: the context and itself, never ending 1
    assert batch.allowed[0].int().tolist() == want
    assert batch.allowed[1].int().tolist() == [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0],
                                               [0, 0, 0, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 0, 1]]
    assert batch.reads == [(0, [2, 3, 4], [4, 5, 6]), (0, [2], [7]), (0, [2, 5], [8, 9]), (1, [1], [5])]
    assert batch.first_read == 1


def test_requests_lm_eval_would_truncate_are_not_grouped() -> None:
    from daprune.evaluation.shared_context import group_requests

    reqs = [(None, [1, 2], [3]), (None, [1, 2], [4, 5]), (None, [1, 2], [6, 7, 8, 9, 10]), (None, [7], [8])]
    groups, plain = group_requests(reqs, max_length=5)
    assert plain == [2]  # 7 tokens > max_length + 1: lm-eval drops its first token, not the shared context's
    assert [(g.context, g.members) for g in groups] == [((1, 2), (0, 1)), ((7,), (3,))]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma3_text", "gemma3_text/wide", "phi3", "opt", "gpt2",
                                    "gpt_neox"])
def test_shared_contexts_give_plain_hflm_answers(one_thread, family: str) -> None:
    """Same answers as plain HFLM from far fewer positions. Gemma-3 as built has an 8-token sliding window,
    shorter than every packed question here, so each goes the plain way (a packed sequence longer than the
    window would change what its sliding layers see); "/wide" widens the window past every sequence."""
    from test_families import FAMILIES
    from test_families import tiny as tiny_llama_like
    from test_families_extra import tiny as tiny_other

    family, _, variant = family.partition("/")
    model = tiny_llama_like(family) if family in FAMILIES else tiny_other(family)
    if variant == "wide":
        model.config.sliding_window = 4096
    shared = _lm(model, True, batch_size=3, share=True)
    plain = ContinuationLogitsHFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=3,
                                   softmax_dtype="float32", progress=False, trim_logits=False, share_contexts=False)
    assert shared.share_contexts and not plain.share_contexts
    shared.cache_hook = _Recorder()
    reqs = _requests(shared.max_length, seed=2)
    ours = shared._loglikelihood_tokens(reqs, disable_tqdm=True)
    ref = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert shared.share_contexts  # the first-group check agreed
    assert [g for _, g in ours] == [g for _, g in ref]
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in ref], abs=1e-4)
    assert shared.cache_hook.added == {r[0]: a for r, a in zip(reqs, ours, strict=True)}
    if getattr(model.config, "sliding_window", None) == 8:
        assert shared.tokens_run == plain.tokens_run
    else:  # every question's context once: fewer positions than one sequence per answer (seeded requests: 45-75%)
        assert shared.tokens_run < 0.8 * plain.tokens_run


def test_a_model_that_ignores_the_packed_mask_is_scored_one_by_one(one_thread, caplog) -> None:
    model = tiny_model(vocab=96)
    original = model.forward

    def forward(input_ids=None, attention_mask=None, position_ids=None, **kwargs):  # drops both
        return original(input_ids=input_ids, **kwargs)

    model.forward = forward
    lm = _lm(model, True, share=True)
    plain = ContinuationLogitsHFLM(pretrained=model, tokenizer=char_tokenizer(), batch_size=4,
                                   softmax_dtype="float32", progress=False, share_contexts=False)
    reqs = _requests(lm.max_length, seed=3)
    with caplog.at_level("WARNING"):
        ours = lm._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert not lm.share_contexts and "disagrees" in caplog.text
    ref = plain._loglikelihood_tokens(reqs, disable_tqdm=True)
    assert [ll for ll, _ in ours] == pytest.approx([ll for ll, _ in ref], abs=1e-5)
