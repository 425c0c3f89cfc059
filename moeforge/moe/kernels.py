"""Grouped matrix products over contiguous per-expert slices of a sorted token batch.

``grouped_linear(x, weight, offsets)`` computes, for every expert e, ``x[start_e:end_e] @ weight[e].T``
where the rows of ``x`` are sorted by expert and ``offsets`` (E,) int32 holds the cumulative
row counts. It uses ``torch.nn.functional.grouped_mm`` (one fused call for all experts, CPU and
CUDA) when the dtype and strides allow it, and a loop over non-empty slices otherwise
(float64 for gradcheck, or sizes whose rows are not 16-byte aligned).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

_GROUPED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def _aligned(n: int, dtype: torch.dtype) -> bool:
    return (n * torch.tensor([], dtype=dtype).element_size()) % 16 == 0


def can_use_grouped_mm(x: Tensor, weight: Tensor) -> bool:
    """True when ``F.grouped_mm`` accepts these operands on this backend."""
    if not hasattr(F, "grouped_mm") or x.dtype not in _GROUPED_DTYPES or weight.dtype != x.dtype:
        return False
    if x.device.type == "cuda" and torch.cuda.get_device_capability(x.device) < (8, 0):
        return False
    _, n, k = weight.shape
    return _aligned(n, x.dtype) and _aligned(k, x.dtype)


def grouped_linear(x: Tensor, weight: Tensor, offsets: Tensor, counts: list[int] | None = None) -> Tensor:
    """Per-expert linear map of expert-sorted rows.

    Args:
        x: (P, K) rows sorted by expert.
        weight: (E, N, K) stacked expert weights in ``nn.Linear`` orientation.
        offsets: (E,) int32 cumulative row counts (offsets[-1] == P).
        counts: optional python list of per-expert row counts (avoids a device sync in the loop path).
    Returns:
        (P, N) with row block e equal to x_e @ weight[e].T.
    """
    if can_use_grouped_mm(x, weight):
        return F.grouped_mm(x, weight.transpose(1, 2), offs=offsets)
    if counts is None:
        counts = torch.diff(offsets, prepend=offsets.new_zeros(1)).tolist()
    outs = [
        torch.mm(chunk, weight[e].t())
        for e, chunk in enumerate(torch.split(x, counts))
        if chunk.shape[0] > 0
    ]
    if not outs:
        return x.new_zeros(0, weight.shape[1])
    return torch.cat(outs)
