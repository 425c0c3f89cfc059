"""Fused gather -> expert MLP -> combine for the CPU, with a hand-written backward.

The generic path (``StackedExperts`` with autograd through ``grouped_linear``) materialises
three fresh (P, H) blocks per layer (gathered inputs, expert outputs, and their gradients),
where P = tokens x k. On CPUs fresh multi-megabyte allocations are returned to the OS and
page-faulted back on every call, and streaming them through memory costs more than the
matmuls at fine-grained shapes. This path walks the experts one at a time instead, gathering
each expert's rows into a small reusable scratch block (max rows per expert, H), and writes the
expert outputs into one reusable (P, H) block (:func:`~moeforge.utils.memory.workspace`, per
thread and dtype):

forward   for each expert e (its P_e pairs):
              rows = x[token_e]                    (scratch)
              h_e  = rows @ W_in[e]^T              (kept for backward, (P_e, 2I))
              a_e  = act(gate) * up                (per expert, or for the whole block at
                                                    once when experts are small)
              y_e  = a_e @ W_out[e]^T              (reused (P, H) block)
          out[t] = sum over t's pairs of w_pair * y   (one parallel embedding_bag pass: no
                                                    zero-fill, no serial scatter-add)
backward  re-gathers x and dL/dy per expert instead of saving (P, H) blocks, recomputes the
          activation from the saved h (SwiGLU by hand, other activations through autograd),
          and sums each token's input gradients with the same embedding_bag combine, so only
          (P, 2I) activations are kept per layer.

Forward and backward are exact reformulations (tested against autograd and by gradcheck).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from ..utils.memory import workspace
from .routing import expert_counts


def _as(weight: Tensor, like: Tensor) -> Tensor:
    """One expert's weight in the activations' dtype: weights stored in a lower precision than the
    activations (inference only) are upcast one expert at a time, never as a whole."""
    return weight if weight.dtype == like.dtype else weight.to(like.dtype)


def _activate(h: Tensor, act, glu: bool, inplace: bool = False) -> Tensor:
    """act(gate) * up for GLU experts (h = [gate | up]), else act(h); a fresh tensor either way
    (``inplace`` multiplies into act's output: outside autograd only)."""
    if glu:
        gate, up = _halves(h)
        return act(gate).mul_(up) if inplace else act(gate) * up
    return act(h)


def _halves(h: Tensor) -> tuple[Tensor, Tensor]:
    """[gate | up] views of (P, 2I) rows; a narrow gate is copied out first, since elementwise CPU
    kernels run several times slower on rows of fewer than ~64 strided elements."""
    gate, up = h.chunk(2, dim=-1)
    return (gate.contiguous() if gate.shape[-1] < 64 else gate), up


# Below this many activation elements per active expert (rows x I), the per-expert elementwise
# calls cost more in dispatch than their work; the forward then activates the whole block at once.
_PHASED_BELOW = 1 << 15


def _phased(h: Tensor, glu: bool, active: list[int]) -> bool:
    width = h.shape[1] // 2 if glu else h.shape[1]
    return bool(active) and h.shape[0] * width < _PHASED_BELOW * len(active)


def _empty_grad(weight: Tensor, counts: list[int]) -> Tensor:
    """A gradient buffer for (E, ...) expert weights: experts with rows are overwritten by the
    loop, so only the idle experts' slices are zeroed (a full zero-fill costs a page-faulting
    pass over the whole tensor on CPU)."""
    grad = torch.empty_like(weight)
    for e, n in enumerate(counts):
        if n == 0:
            grad[e].zero_()
    return grad


def token_bags(token_sorted: Tensor, tokens: int, order: Tensor | None = None, slots: int | None = None):
    """Group expert-sorted pairs by token for the combine: (bag_index (P,), offsets (T,)).

    Pairs bag_index[offsets[t]:offsets[t + 1]] are token t's. With token-major routing of exactly
    ``slots`` pairs per token (``order`` the expert sort of that layout) this is the inverse
    permutation; otherwise a stable sort by token (tokens with no pair get an empty bag).
    """
    pairs = token_sorted.numel()
    if slots is not None and order is not None:
        bag_index = torch.empty_like(order)
        bag_index[order] = torch.arange(pairs, device=order.device)
        return bag_index, torch.arange(0, pairs, slots, device=order.device)
    bag_index = torch.argsort(token_sorted.to(torch.int32), stable=True)
    sizes = expert_counts(token_sorted, tokens)  # pairs per token (the id counter works for any ids)
    return bag_index, torch.cumsum(sizes, 0) - sizes


def _combine(rows: Tensor, bag_index: Tensor, offsets: Tensor, weights: Tensor | None) -> Tensor:
    """(T, H) out[t] = sum of (weighted) rows of token t's pairs: one parallel embedding_bag pass
    (no zero-fill, no serial scatter-add)."""
    return F.embedding_bag(bag_index, rows, offsets, mode="sum", per_sample_weights=weights)


class FusedExpertMLP(torch.autograd.Function):
    """y = sum over pairs p of w_p * expert_{e_p}(x_{t_p}), pairs sorted by expert."""

    @staticmethod
    def forward(ctx, x, w_pair, w_in, w_out, token_sorted, counts, act, glu, bags):
        hidden = x.shape[1]
        bag_index, bag_offsets = bags
        scratch = workspace(max(counts), hidden, x)
        h = x.new_empty(token_sorted.numel(), w_in.shape[1])
        y = workspace(token_sorted.numel(), hidden, x, slot="combine")  # unweighted expert outputs
        toks, hs, ys = token_sorted.split(counts), h.split(counts), y.split(counts)
        active = [e for e, n in enumerate(counts) if n]
        if _phased(h, glu, active):
            # many small experts: one activation pass over the whole block instead of E small ones
            for e in active:
                rows = scratch[: counts[e]]
                torch.index_select(x, 0, toks[e], out=rows)
                torch.mm(rows, _as(w_in[e], x).t(), out=hs[e])
            a = _activate(h, act, glu, inplace=True).split(counts)
            for e in active:
                torch.mm(a[e], _as(w_out[e], x).t(), out=ys[e])
        else:
            # few large experts: each expert's rows stay in cache from gather to output
            for e in active:
                rows = scratch[: counts[e]]
                torch.index_select(x, 0, toks[e], out=rows)
                torch.mm(rows, _as(w_in[e], x).t(), out=hs[e])
                torch.mm(_activate(hs[e], act, glu, inplace=True), _as(w_out[e], x).t(), out=ys[e])
        out = _combine(y, bag_index, bag_offsets, w_pair.to(x.dtype)[bag_index])
        ctx.save_for_backward(x, w_pair, w_in, w_out, token_sorted, h, bag_index, bag_offsets)
        ctx.counts, ctx.act, ctx.glu = counts, act, glu
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        x, w_pair, w_in, w_out, token_sorted, h, bag_index, bag_offsets = ctx.saved_tensors
        if w_in.dtype != x.dtype or w_out.dtype != x.dtype:
            raise RuntimeError("expert weights stored in a lower precision than the activations (upcast one expert "
                               "at a time) are for inference only; cast the model to one dtype to train it")
        counts, act, glu = ctx.counts, ctx.act, ctx.glu
        need_x, need_w, need_in, need_out = ctx.needs_input_grad[:4]
        hidden = x.shape[1]
        grad_out = grad_out.contiguous()
        scratch = workspace(max(counts), hidden, x)
        swiglu = glu and act is F.silu
        if swiglu:  # SwiGLU by hand: no recomputed graph, no concatenated gradient
            width = h.shape[1] // 2
            gate, up = _halves(h)
            if width < 64:
                up = up.contiguous()
            silu = F.silu(gate)
            a_val = silu * up
        else:
            with torch.enable_grad():
                h_ = h.detach().requires_grad_(True)
                a = _activate(h_, act, glu)
            a_val = a.detach()
        wp = w_pair.to(h.dtype).unsqueeze(-1)
        active = [e for e, n in enumerate(counts) if n]
        toks = token_sorted.split(counts)
        grad_a = h.new_empty(a_val.shape)  # dL/d(w * a)
        grad_as = grad_a.split(counts)
        grad_w_out = _empty_grad(w_out, counts) if need_out else None
        weighted = (a_val * wp).split(counts) if need_out else None
        for e in active:
            rows = scratch[: counts[e]]
            torch.index_select(grad_out, 0, toks[e], out=rows)  # dL/dy of these pairs
            torch.mm(rows, w_out[e], out=grad_as[e])
            if need_out:
                torch.mm(rows.t(), weighted[e], out=grad_w_out[e])
        del weighted
        grad_w = (grad_a * a_val).sum(-1).to(w_pair.dtype) if need_w else None
        grad_x = grad_w_in = None
        if need_x or need_in:
            grad_a.mul_(wp)  # now dL/da
            if swiglu:
                # a = silu(g) * u: dL/du = dL/da * silu(g); dL/dg = silu'(g) * (dL/da * u), the last
                # in aten's one-pass silu_backward, written straight into the gate half
                grad_h = torch.empty_like(h)
                torch.mul(grad_a, silu, out=grad_h[:, width:])
                del silu
                torch.ops.aten.silu_backward.grad_input(grad_a.mul_(up), gate, grad_input=grad_h[:, :width])
            else:
                (grad_h,) = torch.autograd.grad(a, h_, grad_a)
            grad_hs = grad_h.split(counts)
            grad_w_in = _empty_grad(w_in, counts) if need_in else None
            pair_grads = workspace(token_sorted.numel(), hidden, x, slot="combine") if need_x else None
            grad_rows = pair_grads.split(counts) if need_x else None
            for e in active:
                if need_in:
                    rows = scratch[: counts[e]]
                    torch.index_select(x, 0, toks[e], out=rows)
                    torch.mm(grad_hs[e].t(), rows, out=grad_w_in[e])
                if need_x:
                    torch.mm(grad_hs[e], w_in[e], out=grad_rows[e])  # dL/dx of each pair
            if need_x:
                grad_x = _combine(pair_grads, bag_index, bag_offsets, None)
        return grad_x, grad_w, grad_w_in, grad_w_out, None, None, None, None, None


def fused_expert_mlp(x: Tensor, w_pair: Tensor, w_in: Tensor, w_out: Tensor, token_sorted: Tensor,
                     counts: list[int], act, glu: bool, bags: tuple[Tensor, Tensor] | None = None) -> Tensor:
    """Apply expert MLPs to expert-sorted pairs and scatter-add into (T, H).

    Args:
        x: (T, H) tokens.
        w_pair: (P,) combine weight of each pair, in expert-sorted order.
        w_in: (E, 2I or I, H) gate_up_proj or up_proj; w_out: (E, H, I) down_proj.
        token_sorted: (P,) token of each pair, sorted by expert.
        counts: python list, pairs per expert (sums to P).
        bags: :func:`token_bags` of these pairs (computed here when not given).
    """
    if bags is None:
        bags = token_bags(token_sorted, x.shape[0])
    return FusedExpertMLP.apply(x, w_pair, w_in, w_out, token_sorted, counts, act, glu, bags)
