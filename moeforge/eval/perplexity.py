"""Perplexity over non-overlapping fixed-length windows, with throughput and routing capture."""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class NLLResult:
    """Summed next-token negative log-likelihood over a token stream.

    Attributes:
        nll_sum: sum over predicted positions of -log p(token | prefix), in nats.
        predictions: number of predicted positions (each window of L tokens predicts L - 1).
        tokens: tokens fed to the model (predictions plus one per window).
        seconds: wall time of the forward passes.
    """

    nll_sum: float
    predictions: int
    tokens: int
    seconds: float

    @property
    def mean_nll(self) -> float:
        return self.nll_sum / self.predictions

    @property
    def perplexity(self) -> float:
        """exp(mean NLL); inf when that overflows a float (mean NLL above ~709.8 nats, a broken model)."""
        try:
            return math.exp(self.mean_nll)
        except OverflowError:
            return float("inf")

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


def windows(input_ids: Tensor, seq_len: int, max_tokens: int | None = None) -> Tensor:
    """(W, L) non-overlapping windows of ``input_ids`` (N,).

    The stream is cut to ``max_tokens``, then into ``N // seq_len`` windows of ``seq_len``; the
    last partial window is dropped unless it is the only one (then W = 1, L = N).
    """
    ids = input_ids.reshape(-1)
    if max_tokens is not None:
        ids = ids[:max_tokens]
    n = ids.numel()
    if n < 2:
        raise ValueError(f"perplexity needs at least two tokens, got {n}")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2, got {seq_len}")
    count = n // seq_len
    if count == 0:
        return ids.unsqueeze(0)
    return ids[: count * seq_len].view(count, seq_len)


def _accepts_routing(model) -> bool:
    """Whether ``model(ids, output_routing=True)`` returns moeforge routing: a moeforge MoE model, or an
    adapter (``AdaptedModel``) on one, or a CALM composition (``ComposedForCausalLM``) whose anchor is one."""
    from ..compose.model import ComposedForCausalLM
    from ..models import MoeforgeForCausalLM
    from ..peft.model import AdaptedModel

    if isinstance(model, AdaptedModel):
        return _accepts_routing(model.base_model)
    if isinstance(model, ComposedForCausalLM):
        return _accepts_routing(model.anchor)
    return isinstance(model, MoeforgeForCausalLM)


@torch.no_grad()
def evaluate_nll(
    model,
    input_ids: Tensor,
    *,
    seq_len: int = 512,
    max_tokens: int | None = None,
    batch_size: int = 4,
    on_routing: Callable[[tuple, Tensor], None] | None = None,
) -> NLLResult:
    """Next-token NLL of ``model`` over the windows of ``input_ids`` (see :func:`windows`).

    ``on_routing(routing, batch)`` is called after every batch with the per-layer
    :class:`~moeforge.moe.Routing` tuple (None entries for dense layers) and the (B, L) batch of
    token ids, when the model is a moeforge MoE model (or an adapter on one, or a composition
    whose anchor is one); it is how routing statistics are
    gathered in the same pass as perplexity. The model is put in eval mode for the call and
    restored afterwards.
    """
    chunks = windows(input_ids, seq_len, max_tokens)
    device = next(model.parameters()).device
    want_routing = on_routing is not None and _accepts_routing(model)
    was_training = model.training
    model.eval()
    total_nll, count, seconds = 0.0, 0, 0.0
    try:
        for start in range(0, chunks.shape[0], batch_size):
            batch = chunks[start : start + batch_size].to(device)
            t0 = time.perf_counter()
            if want_routing:
                out = model(batch, output_routing=True, use_cache=False)
            else:
                out = model(batch, use_cache=False)
            logits = out.logits.float()
            seconds += time.perf_counter() - t0
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            nll = -logp.gather(-1, batch[:, 1:, None]).squeeze(-1)
            total_nll += nll.sum().item()
            count += nll.numel()
            if want_routing and out.routing is not None:
                on_routing(out.routing, batch)
    finally:
        model.train(was_training)
    return NLLResult(total_nll, count, int(chunks.numel()), seconds)


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
    return evaluate_nll(model, input_ids, seq_len=seq_len, max_tokens=max_tokens, batch_size=batch_size).perplexity
