"""Data-free calibration in the instruct model's own register: conversations it writes for itself.

``self`` samples text from BOS plus one random token, which gives a chat model's pre-training register (web
prose, lists, code) but seldom what it was tuned to write: answers to requests, step by step. Those are the
register of how-to text (HellaSwag's WikiHow half, PIQA's goals and solutions), where a prune calibrated on
stories, Wikipedia and ``self`` text loses about twice as much as on those texts (docs/quality.md). ``chat`` asks
the model for both sides of a conversation, as Magpie (Xu et al. 2024) builds instruction data: the chat
template's opening up to the user's message makes the model write a request; the template's turn change then
makes it answer. No text from anywhere else is read.

Each row: the template's opening (its default system prompt included), the model's request (sampled until its
end-of-turn token, at most half of what is left of the row), the template's tokens between the request and the
answer, then the answer, sampled until the row is full (end of turn suppressed, as ``self`` suppresses EOS).
"""

from __future__ import annotations

import torch

from daprune.errors import CalibrationError

_MARK = "QQCHATMARKQQ"


def chat_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The template's tokens before a user's message (``opening``) and between it and the answer (``turn``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise CalibrationError("calibration source 'chat' needs a tokenizer with a chat template (an instruct or "
                               "chat model's); this one has none: use self")
    text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], add_generation_prompt=True,
                                         tokenize=False)
    if text.count(_MARK) != 1:
        raise CalibrationError("the chat template does not write the user's message once as given; cannot find "
                               "where the model's request goes")
    before, after = text.split(_MARK)
    return (tokenizer(before, add_special_tokens=False).input_ids,
            tokenizer(after, add_special_tokens=False).input_ids)


def _end_ids(model, tokenizer, turn: list[int]) -> list[int]:
    """Tokens that end the user's turn: the model's EOS ids, the tokenizer's, and the template's first token after
    the message where it is a special token (``<|im_end|>``, ``<end_of_turn>``)."""
    ids = model.generation_config.eos_token_id
    ends = set(ids if isinstance(ids, list) else [] if ids is None else [ids])
    if tokenizer.eos_token_id is not None:
        ends.add(tokenizer.eos_token_id)
    if turn and turn[0] in set(tokenizer.all_special_ids):
        ends.add(turn[0])
    return sorted(ends)


def question_budget(seqlen: int, opening: int, turn: int) -> int:
    """Most tokens a request may take: half of what the template leaves of a row (the rest is for the answer)."""
    return (seqlen - opening - turn) // 2


@torch.no_grad()
def continue_rows(model, prompts: list[list[int]], seqlen: int, ends: list[int], pad: int,
                  sampling: dict) -> list[list[int]]:
    """Each prompt continued to ``seqlen`` tokens in one batch, ``ends`` suppressed: prompts of different lengths are
    padded on the left and masked, so every row continues as it would alone."""
    width = max(map(len, prompts))
    padded = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    new = seqlen - min(map(len, prompts))
    out = model.generate(input_ids=padded.to(model.device), attention_mask=mask.to(model.device),
                         max_new_tokens=new, min_new_tokens=new, eos_token_id=ends, pad_token_id=pad,
                         **sampling).cpu()
    return [p + row[: seqlen - len(p)] for p, row in zip(prompts, out[:, width:].tolist(), strict=True)]


@torch.no_grad()
def self_chat(model, tokenizer, nsamples: int, seqlen: int, seed: int, *, temperature: float, top_p: float,
              batch_size: int = 16, progress: bool = True) -> torch.Tensor:
    """``[nsamples, seqlen]`` conversations the model writes for itself (``describe`` says how they were made)."""
    from tqdm.auto import tqdm

    opening, turn = chat_frame(tokenizer)
    budget = question_budget(seqlen, len(opening), len(turn))
    if budget < 4:
        raise CalibrationError(f"--seqlen {seqlen} is too short for chat rows: the template takes "
                               f"{len(opening) + len(turn)} tokens, leaving under 8 for a request and its answer")
    ends = _end_ids(model, tokenizer, turn)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p, "top_k": 0}
    torch.manual_seed(seed)
    rows = []
    for start in tqdm(range(0, nsamples, batch_size), desc="self-generating conversations", disable=not progress):
        b = min(batch_size, nsamples - start)
        prompt = torch.tensor([opening] * b)
        asked = model.generate(input_ids=prompt.to(model.device), attention_mask=torch.ones_like(prompt).to(
            model.device), max_new_tokens=budget, eos_token_id=ends, pad_token_id=pad, **sampling).cpu()
        prompts = []
        for row in asked[:, len(opening):].tolist():
            cut = next((i for i, t in enumerate(row) if t in ends), len(row))
            prompts.append(opening + row[:cut] + turn)
        rows += continue_rows(model, prompts, seqlen, ends, pad, sampling)
    return torch.tensor(rows)


def describe(ids: torch.Tensor, tokenizer) -> dict:
    """How chat rows were made, with their requests' lengths read off the rows (fresh or from the cache alike):
    a request runs from the end of the template's opening to the template's turn change."""
    opening, turn = chat_frame(tokenizer)
    budget = question_budget(ids.shape[1], len(opening), len(turn))
    lengths = []
    for row in ids.tolist():
        at = next((i for i in range(len(opening), len(row) - len(turn) + 1) if row[i:i + len(turn)] == turn), None)
        if at is None:
            raise CalibrationError("a chat calibration row has no turn change after its request: the rows were not "
                                   "made with this tokenizer's chat template")
        lengths.append(at - len(opening))
    return {"prompt": "the chat template's opening; the model writes a request (to its end of turn, at most "
                      f"{budget} tokens), then the template's turn change, then its answer to the row's end",
            "template_tokens": {"opening": len(opening), "turn": len(turn)},
            "request_tokens": {"min": min(lengths), "mean": round(sum(lengths) / len(lengths), 1),
                               "max": max(lengths), "at_budget": sum(n == budget for n in lengths)}}
