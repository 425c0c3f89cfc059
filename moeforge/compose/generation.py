"""Decoding for composed models: greedy or sampled, with or without the composition cache.

Kept separate from transformers' ``GenerationMixin`` because a composition carries three caches
(anchor, augmenting, per-connection keys/values) that transformers' cache machinery does not
know; the loop here feeds every new token to both models at every step.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from ..errors import MoeforgeError


def _eos_ids(model, eos_token_id) -> list[int]:
    if eos_token_id is None:
        gen = getattr(model.anchor, "generation_config", None)
        eos_token_id = getattr(gen, "eos_token_id", None) if gen is not None else None
        if eos_token_id is None:
            eos_token_id = getattr(model.anchor.config, "eos_token_id", None)
    if eos_token_id is None:
        return []
    return [int(eos_token_id)] if isinstance(eos_token_id, int) else [int(i) for i in eos_token_id]


def next_token_scores(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> Tensor:
    """logits (batch, vocab) -> tempered scores with everything outside top-k / top-p set to -inf.

    ``top_k`` None or 0 keeps every token (as in transformers)."""
    scores = logits.float() / temperature
    if top_k and top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = torch.sort(scores, dim=-1, descending=True)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_scores.softmax(-1) > top_p  # keep the smallest prefix reaching top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    return scores


def decode_loop(
    model,
    input_ids: torch.LongTensor,
    attention_mask: Tensor | None,
    *,
    max_new_tokens: int,
    do_sample: bool,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    eos_token_id: int | Sequence[int] | None,
    pad_token_id: int | None,
    use_cache: bool,
    generator: torch.Generator | None,
) -> torch.LongTensor:
    if input_ids.dim() != 2 or input_ids.shape[1] == 0:
        raise MoeforgeError(f"generate needs input_ids of shape (batch, prompt length >= 1), got {tuple(input_ids.shape)}.")
    if max_new_tokens < 0:
        raise MoeforgeError(f"max_new_tokens must be >= 0, got {max_new_tokens}.")
    if top_k is not None and top_k < 0:
        raise MoeforgeError(f"top_k must be >= 0 (0 or None: no top-k filter), got {top_k}.")
    if do_sample and temperature <= 0:
        raise MoeforgeError(f"temperature must be > 0 when sampling, got {temperature}; use do_sample=False for greedy.")
    device = model.device
    ids = input_ids.to(device)
    if attention_mask is None:
        attention_mask = torch.ones_like(ids)
    mask = attention_mask.to(device).long()
    if not bool(mask[:, -1].all()):
        raise MoeforgeError("generate needs left padding (the last prompt position must be a token in every row); "
                            "set tokenizer.padding_side = 'left'.")
    eos = _eos_ids(model, eos_token_id)
    pad = pad_token_id if pad_token_id is not None else (eos[0] if eos else 0)
    finished = torch.zeros(ids.shape[0], dtype=torch.bool, device=device)
    eos_t = torch.tensor(eos, device=device) if eos else None
    cache = model.new_cache() if use_cache else None
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    step_ids, step_pos = ids, positions
    for _ in range(max_new_tokens):
        out = model(
            step_ids, attention_mask=mask, position_ids=step_pos, past_key_values=cache,
            use_cache=use_cache, logits_to_keep=1,
        )
        logits = out.logits[:, -1, :]
        if do_sample:
            probs = next_token_scores(logits, temperature, top_k, top_p).softmax(-1)
            token = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
        else:
            token = logits.argmax(-1)
        token = torch.where(finished, torch.full_like(token, pad), token)
        ids = torch.cat([ids, token[:, None]], dim=1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        positions = torch.cat([positions, positions[:, -1:] + 1], dim=1)
        if eos_t is not None:
            finished |= torch.isin(token, eos_t)
            if bool(finished.all()):
                break
        step_ids, step_pos = (token[:, None], positions[:, -1:]) if use_cache else (ids, positions)
    return ids
