"""Grouped matrix products over contiguous per-expert slices of an expert-sorted token block.

``grouped_linear(x, weight, offsets)`` computes, for every expert e, ``x[start_e:end_e] @ weight[e].T``
where the rows of ``x`` are sorted by expert and ``offsets`` (E,) int32 holds the cumulative row
counts. Forward and the input gradient use ``torch.nn.functional.grouped_mm`` (one fused call for
all experts, CPU and CUDA) when dtype and strides allow; the weight gradient is computed per
expert slice on CPU (PyTorch's CPU backward of ``grouped_mm`` is several times slower than the
forward for many small groups) and with the (2-D, 2-D) grouped product on GPUs. Operands the
fused kernel refuses (float64 for gradcheck, rows not 16-byte aligned) take a loop over slices.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def rows_aligned(n: int, dtype: torch.dtype) -> bool:
    """Whether rows of ``n`` elements of ``dtype`` span a multiple of 16 bytes (``grouped_mm``'s stride rule)."""
    return (n * torch.empty((), dtype=dtype).element_size()) % 16 == 0


def can_use_grouped_mm(x: Tensor, weight: Tensor) -> bool:
    """True when ``F.grouped_mm`` accepts these operands on this backend."""
    if not hasattr(F, "grouped_mm") or x.dtype not in _GROUPED_DTYPES or weight.dtype != x.dtype:
        return False
    if x.device.type == "cuda":
        # the CUDA kernel takes bfloat16 on SM >= 80 (torch.nn.functional.grouped_mm docs)
        if x.dtype != torch.bfloat16 or torch.cuda.get_device_capability(x.device) < (8, 0):
            return False
    _, n, k = weight.shape
    return rows_aligned(n, x.dtype) and rows_aligned(k, x.dtype)


def _split_counts(offsets: Tensor) -> list[int]:
    return torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()


def _loop_linear(x: Tensor, weight: Tensor, counts: list[int]) -> Tensor:
    outs = [torch.mm(chunk, weight[e].t()) for e, chunk in enumerate(torch.split(x, counts)) if chunk.shape[0]]
    return torch.cat(outs) if outs else x.new_zeros(0, weight.shape[1])


class _GroupedLinear(torch.autograd.Function):
    """y = x_e @ W_e^T per expert slice, with a fast weight gradient."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, offsets: Tensor) -> Tensor:
        ctx.save_for_backward(x, weight, offsets)
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)

    @staticmethod
    def backward(ctx, grad: Tensor):
        x, weight, offsets = ctx.saved_tensors
        grad = grad.contiguous()
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = F.grouped_mm(grad, weight, offs=offsets)
        if ctx.needs_input_grad[1]:
            if grad.device.type == "cuda":
                grad_w = F.grouped_mm(grad.t(), x, offs=offsets)
            else:
                grad_w = torch.zeros_like(weight)
                counts = _split_counts(offsets)
                for e, (g_e, x_e) in enumerate(zip(torch.split(grad, counts), torch.split(x, counts))):
                    if g_e.shape[0]:
                        torch.mm(g_e.t(), x_e, out=grad_w[e])
        return grad_x, grad_w, None


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, counts: list[int] | None = None) -> Tensor:
    """Per-expert linear map of expert-sorted rows.

    Args:
        x: (P, K) rows sorted by expert.
        weight: (E, N, K) stacked expert weights in ``nn.Linear`` orientation.
        offsets: (E,) int32 cumulative row counts (offsets[-1] == P).
        counts: optional python list of per-expert row counts (spares a device sync in the loop path).
    Returns:
        (P, N) whose row block e equals x_e @ weight[e].T.
    """
    if can_use_grouped_mm(x, weight):
        if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
            return _GroupedLinear.apply(x, weight, offsets)
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    return _loop_linear(x, weight, counts if counts is not None else _split_counts(offsets))
