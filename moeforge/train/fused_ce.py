"""Next-token loss straight from the last hidden states, without materialising the logits.

For a (B x S) batch and a V-word vocabulary the usual path keeps (B*S, V) float32 logits, their
log-softmax and its gradient alive at once: 3 x 805 MB for 4,096 tokens of SmolLM2's 49,152-word
vocabulary. Here the LM head and the cross-entropy run together over chunks of rows: each
chunk's logits are computed, turned into per-token losses and, in the same pass, into the
gradients with respect to the hidden states and the head weight, then dropped. The backward
pass only scales those gradients. The head matmuls are the same three as in the unfused path,
so nothing is recomputed (the approach of Liger-Kernel's fused linear cross-entropy).

Exact: the loss and gradients equal ``F.cross_entropy(hidden @ W.T, targets)`` up to float32
summation order (tested).
"""

from __future__ import annotations

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..utils.memory import workspace

IGNORE_INDEX = -100


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, targets: Tensor, scale: float, chunk: int):
        rows = hidden.shape[0]
        per_token = hidden.new_zeros(rows, dtype=torch.float32)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_h = torch.empty_like(hidden) if need_h else None
        grad_w = torch.zeros_like(weight) if need_w else None
        for start in range(0, rows, chunk):
            end = min(rows, start + chunk)
            h = hidden[start:end]
            tgt = targets[start:end]
            valid = tgt != IGNORE_INDEX
            safe = tgt.clamp_min(0)
            if hidden.dtype == torch.float32:  # into a block reused across chunks and steps
                logits = torch.mm(h, weight.t(), out=workspace(end - start, weight.shape[0], h))
            else:
                logits = (h @ weight.t()).float()  # (c, V)
            picked = logits.gather(1, safe[:, None]).squeeze(1)
            # log-sum-exp in place: a fresh (c, V) temporary per chunk (what torch.logsumexp
            # allocates) costs page faults on every call on CPU, more than the arithmetic
            peak = logits.amax(dim=-1)
            probs = logits.sub_(peak[:, None]).exp_()  # unnormalised softmax, in place
            total = probs.sum(dim=-1)
            lse = peak + total.log()
            per_token[start:end] = torch.where(valid, lse - picked, torch.zeros_like(lse))
            if need_h or need_w:
                row_scale = valid.to(probs.dtype) * scale
                probs.mul_((row_scale / total)[:, None])  # softmax * scale
                probs[torch.arange(end - start, device=probs.device), safe] -= row_scale
                probs = probs.to(hidden.dtype)
                if need_h:
                    torch.mm(probs, weight, out=grad_h[start:end])
                if need_w:
                    grad_w.addmm_(probs.t(), h)
        ctx.save_for_backward(grad_h, grad_w)
        ctx.mark_non_differentiable(per_token)
        loss = per_token.sum() * scale
        return loss, per_token

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss: Tensor, _grad_per_token):
        grad_h, grad_w = ctx.saved_tensors
        g = grad_loss.to(torch.float32)
        return (
            None if grad_h is None else grad_h * g.to(grad_h.dtype),
            None if grad_w is None else grad_w * g.to(grad_w.dtype),
            None,
            None,
            None,
        )


def linear_cross_entropy(
    hidden: Tensor, weight: Tensor, targets: Tensor, *, scale: float = 1.0, chunk: int = 1024
) -> tuple[Tensor, Tensor]:
    """``scale * sum_t CE(hidden_t @ weight.T, target_t)`` and the per-token losses (detached).

    Args:
        hidden: (N, H) final hidden states (after the last norm).
        weight: (V, H) LM head weight (no bias).
        targets: (N,) token ids, -100 where no loss is taken.
        scale: multiplier applied to the summed loss (and hence to the gradients).
        chunk: rows per chunk; peak extra memory is chunk x V floats.
    Returns:
        (scalar loss with gradient to ``hidden`` and ``weight``, (N,) float32 per-token losses).
    """
    return _LinearCrossEntropy.apply(hidden, weight, targets, float(scale), int(chunk))
