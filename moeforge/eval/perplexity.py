"""Perplexity over non-overlapping fixed-length windows."""

from __future__ import annotations

import math

import torch
from torch import Tensor


@torch.no_grad()
def perplexity(
    model,
    input_ids: Tensor,
    *,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
) -> float:
    """exp(mean next-token negative log-likelihood) over windows of ``seq_len`` tokens.

    ``input_ids`` (N,) is cut into consecutive non-overlapping windows (the last partial window
    is dropped unless it is the only one); inside each window every position but the first is
    predicted, so a window of L tokens contributes L - 1 predictions. This is the protocol of the
    reference figure for SmolLM2 on WikiText-2 (first 8192 tokens, 512-token windows).
    """
    ids = input_ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel()
    if n < 2:
        raise ValueError("perplexity needs at least two tokens")
    windows = n // seq_len
    if windows == 0:
        chunks = ids.unsqueeze(0)
    else:
        chunks = ids[: windows * seq_len].view(windows, seq_len)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total_nll, total_count = 0.0, 0
    for start in range(0, chunks.shape[0], batch_size):
        batch = chunks[start : start + batch_size].to(device)
        logits = model(batch).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
        total_nll += nll.sum().item()
        total_count += nll.numel()
    model.train(was_training)
    return math.exp(total_nll / total_count)
