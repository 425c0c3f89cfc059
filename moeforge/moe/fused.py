"""Fused gather -> expert MLP -> scatter for the CPU, with a hand-written backward.

The generic path (``StackedExperts`` with autograd through ``grouped_linear``) materialises
three (P, H) blocks per layer (gathered inputs, expert outputs, and their gradients), where
P = tokens x k. On CPUs these fresh multi-megabyte allocations are returned to the OS and
page-faulted back on every call, which costs more than the matmuls at fine-grained shapes. This
path keeps one reusable (P, H) workspace per thread and dtype instead:

forward   xs = x[token]              (workspace)
          h  = xs_e @ W_in[e]^T      per expert slice
          a  = act(gate) * up,  aw = a * w_pair
          ys = aw_e @ W_out[e]^T     (into the same workspace; xs is dead by then)
          y  = scatter_add(ys -> token)
backward  re-gathers x instead of saving xs, and recomputes a from the saved h, so only
          (P, 2I) activations are kept per layer instead of (P, H).

Forward and backward are exact reformulations (tested against autograd and by gradcheck).
"""

from __future__ import annotations

import threading

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

_workspace = threading.local()


def workspace(rows: int, cols: int, like: Tensor) -> Tensor:
    """A (rows, cols) scratch tensor reused across calls on this thread (grown when too small)."""
    key = (like.device, like.dtype)
    cache = getattr(_workspace, "buffers", None)
    if cache is None:
        cache = _workspace.buffers = {}
    buf = cache.get(key)
    need = rows * cols
    if buf is None or buf.numel() < need:
        buf = torch.empty(need, device=like.device, dtype=like.dtype)
        cache[key] = buf
    return buf[:need].view(rows, cols)


def _slices(counts: list[int]):
    start = 0
    for e, n in enumerate(counts):
        if n:
            yield e, start, start + n
        start += n


def _activate(h: Tensor, act, glu: bool) -> Tensor:
    if glu:
        gate, up = h.chunk(2, dim=-1)
        return act(gate) * up
    return act(h)


class FusedExpertMLP(torch.autograd.Function):
    """y = sum over pairs p of w_p * expert_{e_p}(x_{t_p}), pairs sorted by expert."""

    @staticmethod
    def forward(ctx, x, w_pair, w_in, w_out, token_sorted, counts, act, glu):
        tokens, hidden = x.shape
        pairs = token_sorted.numel()
        buf = workspace(pairs, hidden, x)
        torch.index_select(x, 0, token_sorted, out=buf)
        h = x.new_empty(pairs, w_in.shape[1])
        for e, s, t in _slices(counts):
            torch.mm(buf[s:t], w_in[e].t(), out=h[s:t])
        if glu:
            gate, up = h.chunk(2, dim=-1)
            aw = act(gate).mul_(up)
        else:
            aw = act(h)
        aw.mul_(w_pair.to(h.dtype).unsqueeze(-1))
        for e, s, t in _slices(counts):
            torch.mm(aw[s:t], w_out[e].t(), out=buf[s:t])
        out = x.new_zeros(tokens, hidden).index_add_(0, token_sorted, buf)
        ctx.save_for_backward(x, w_pair, w_in, w_out, token_sorted, h)
        ctx.counts, ctx.act, ctx.glu = counts, act, glu
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_pair, w_in, w_out, token_sorted, h = ctx.saved_tensors
        counts, act, glu = ctx.counts, ctx.act, ctx.glu
        need_x, need_w, need_in, need_out = ctx.needs_input_grad[:4]
        pairs, hidden = token_sorted.numel(), x.shape[1]
        buf = workspace(pairs, hidden, x)
        torch.index_select(grad_out.contiguous(), 0, token_sorted, out=buf)  # dL/dys
        with torch.enable_grad():
            h_ = h.detach().requires_grad_(True)
            a = _activate(h_, act, glu)
        wp = w_pair.to(h.dtype).unsqueeze(-1)
        grad_aw = h.new_empty(pairs, w_out.shape[2])
        grad_w_out = torch.zeros_like(w_out) if need_out else None
        aw = (a.detach() * wp) if need_out else None
        for e, s, t in _slices(counts):
            torch.mm(buf[s:t], w_out[e], out=grad_aw[s:t])
            if need_out:
                torch.mm(buf[s:t].t(), aw[s:t], out=grad_w_out[e])
        grad_w = (grad_aw * a.detach()).sum(-1).to(w_pair.dtype) if need_w else None
        grad_x = grad_w_in = None
        if need_x or need_in:
            (grad_h,) = torch.autograd.grad(a, h_, grad_aw * wp)
            torch.index_select(x, 0, token_sorted, out=buf)  # xs, re-gathered
            grad_w_in = torch.zeros_like(w_in) if need_in else None
            for e, s, t in _slices(counts):
                if need_in:
                    torch.mm(grad_h[s:t].t(), buf[s:t], out=grad_w_in[e])
                if need_x:
                    torch.mm(grad_h[s:t], w_in[e], out=buf[s:t])  # overwrite xs_e with dL/dxs_e
            if need_x:
                grad_x = torch.zeros_like(x).index_add_(0, token_sorted, buf)
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
