"""Precision helpers shared by the routers (MoE layer, PEFT experts) and the conversion's refits."""

from __future__ import annotations

import contextlib

import torch


def at_least_float32(dtype: torch.dtype) -> torch.dtype:
    """float32 for float32 and lower precisions, float64 for float64: the dtype of router arithmetic
    (never below float32) and of weights refitted in float32 (never rounded back to a bf16 source)."""
    return torch.promote_types(dtype, torch.float32)


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context in which autocast is off, so float32 operands compute in float32.

    Routers keep their arithmetic in float32 (Switch Transformer's selective precision, Fedus et
    al. 2021, sec. 2.4); under autocast their matmuls would otherwise run in bf16/fp16 whatever
    the operands' dtype. Outside autocast this is a no-op context.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
