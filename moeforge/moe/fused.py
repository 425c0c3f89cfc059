"""Fused gather -> expert MLP -> scatter for the CPU, with a hand-written backward.

The generic path (``StackedExperts`` with autograd through ``grouped_linear``) materialises
three (P, H) blocks per layer (gathered inputs, expert outputs, and their gradients), where
P = tokens x k. On CPUs these fresh multi-megabyte allocations are returned to the OS and
page-faulted back on every call, and streaming them through memory costs more than the
matmuls at fine-grained shapes. This path walks the experts one at a time instead, so each
expert's rows stay in cache from gather to scatter, in a small reusable scratch block
(max rows per expert, H) per thread and dtype:

forward   for each expert e (its P_e pairs):
              rows = x[token_e]                    (scratch)
              h_e  = rows @ W_in[e]^T              (kept for backward, (P_e, 2I))
              a_e  = act(gate) * up * w_pair
              rows = a_e @ W_out[e]^T              (overwrites the dead inputs)
              y[token_e] += rows
backward  re-gathers x and dL/dy per expert instead of saving (P, H) blocks, and recomputes
          the activation from the saved h, so only (P, 2I) activations are kept per layer.

Forward and backward are exact reformulations (tested against autograd and by gradcheck).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..utils.memory import workspace

def _slices(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _as(weight: Tensor, like: Tensor) -> Tensor:
    """One expert's weight in the activations' dtype: weights stored in a lower precision than the
    activations (inference only) are upcast one expert at a time, never as a whole."""
    return weight if weight.dtype == like.dtype else weight.to(like.dtype)


def _activate(h: Tensor, act, glu: bool) -> Tensor:
    if glu:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


def _empty_grad(weight: Tensor, counts: list[int]) -> Tensor:
    """A gradient buffer for (E, ...) expert weights: experts with rows are overwritten by the
    loop, so only the idle experts' slices are zeroed (a full zero-fill costs a page-faulting
    pass over the whole tensor on CPU)."""
    grad = torch.empty_like(weight)
    for e, n in enumerate(counts):
        if n == 0:
            grad[e].zero_()
    return grad


class FusedExpertMLP(torch.autograd.Function):
    """y = sum over pairs p of w_p * expert_{e_p}(x_{t_p}), pairs sorted by expert."""

    @staticmethod
    def forward(ctx, x, w_pair, w_in, w_out, token_sorted, counts, act, glu):
        tokens, hidden = x.shape
        scratch = workspace(max(counts), hidden, x)
        h = x.new_empty(token_sorted.numel(), w_in.shape[1])
        out = x.new_zeros(tokens, hidden)
        wp = w_pair.to(x.dtype).unsqueeze(-1)
        for e, s, t in _slices(counts):
            rows = scratch[: t - s]
            tok = token_sorted[s:t]
            torch.index_select(x, 0, tok, out=rows)
            h_e = h[s:t]
            torch.mm(rows, _as(w_in[e], x).t(), out=h_e)
            if glu:
                gate, up = h_e.chunk(2, dim=-1)
                a_e = act(gate).mul_(up)
            else:
                a_e = act(h_e)
            a_e.mul_(wp[s:t])
            torch.mm(a_e, _as(w_out[e], x).t(), out=rows)  # the gathered inputs are dead: reuse their rows
            out.index_add_(0, tok, rows)
        ctx.save_for_backward(x, w_pair, w_in, w_out, token_sorted, h)
        ctx.counts, ctx.act, ctx.glu = counts, act, glu
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_pair, w_in, w_out, token_sorted, h = ctx.saved_tensors
        if w_in.dtype != x.dtype or w_out.dtype != x.dtype:
            raise RuntimeError("expert weights in a lower precision than the activations are for inference only")
        counts, act, glu = ctx.counts, ctx.act, ctx.glu
        need_x, need_w, need_in, need_out = ctx.needs_input_grad[:4]
        hidden = x.shape[1]
        grad_out = grad_out.contiguous()
        scratch = workspace(max(counts), hidden, x)
        swiglu = glu and act is F.silu
        if swiglu:  # SwiGLU by hand: no recomputed graph, no concatenated gradient
            width = h.shape[1] // 2
            gate, up = h[:, :width], h[:, width:]
            sig = torch.sigmoid(gate)
            silu = gate * sig
            a_val = silu * up
        else:
            with torch.enable_grad():
                h_ = h.detach().requires_grad_(True)
                a = _activate(h_, act, glu)
            a_val = a.detach()
        wp = w_pair.to(h.dtype).unsqueeze(-1)
        grad_a = h.new_empty(a_val.shape)  # dL/d(w * a)
        grad_w_out = _empty_grad(w_out, counts) if need_out else None
        for e, s, t in _slices(counts):
            rows = scratch[: t - s]
            torch.index_select(grad_out, 0, token_sorted[s:t], out=rows)  # dL/dy of these pairs
            torch.mm(rows, w_out[e], out=grad_a[s:t])
            if need_out:
                torch.mm(rows.t(), a_val[s:t] * wp[s:t], out=grad_w_out[e])
        grad_w = (grad_a * a_val).sum(-1).to(w_pair.dtype) if need_w else None
        grad_x = grad_w_in = None
        if need_x or need_in:
            grad_a.mul_(wp)  # now dL/da
            if swiglu:
                # a = silu(g) * u: da/du = silu(g); da/dg = u * silu'(g), silu' = sig + silu * (1 - sig)
                grad_h = torch.empty_like(h)
                torch.mul(grad_a, silu, out=grad_h[:, width:])
                d_silu = torch.rsub(sig, 1.0).mul_(silu).add_(sig)
                torch.mul(d_silu.mul_(up), grad_a, out=grad_h[:, :width])
                del sig, silu, d_silu
            else:
                (grad_h,) = torch.autograd.grad(a, h_, grad_a)
            grad_w_in = _empty_grad(w_in, counts) if need_in else None
            grad_x = torch.zeros_like(x) if need_x else None
            for e, s, t in _slices(counts):
                rows = scratch[: t - s]
                tok = token_sorted[s:t]
                if need_in:
                    torch.index_select(x, 0, tok, out=rows)
                    torch.mm(grad_h[s:t].t(), rows, out=grad_w_in[e])
                if need_x:
                    torch.mm(grad_h[s:t], w_in[e], out=rows)
                    grad_x.index_add_(0, tok, rows)
        return grad_x, grad_w, grad_w_in, grad_w_out, None, None, None, None


def fused_expert_mlp(x: Tensor, w_pair: Tensor, w_in: Tensor, w_out: Tensor, token_sorted: Tensor,
                     counts: list[int], act, glu: bool) -> Tensor:
    """Apply expert MLPs to expert-sorted pairs and scatter-add into (T, H).

    Args:
        x: (T, H) tokens.
        w_pair: (P,) combine weight of each pair, in expert-sorted order.
        w_in: (E, 2I or I, H) gate_up_proj or up_proj; w_out: (E, H, I) down_proj.
        token_sorted: (P,) token of each pair, sorted by expert.
        counts: python list, pairs per expert (sums to P).
    """
    return FusedExpertMLP.apply(x, w_pair, w_in, w_out, token_sorted, counts, act, glu)
