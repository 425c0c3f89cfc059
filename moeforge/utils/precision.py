"""Precision helpers shared by the routers of the MoE layer and of the PEFT experts."""

from __future__ import annotations

import contextlib

import torch


def autocast_off(device_type: str) -> contextlib.AbstractContextManager:
    """A context in which autocast is off, so float32 operands compute in float32.

    Routers keep their arithmetic in float32 (Switch Transformer's selective precision, Fedus et
    al. 2021, sec. 2.4); under autocast their matmuls would otherwise run in bf16/fp16 whatever
    the operands' dtype. Outside autocast this is a no-op context.
    """
    if torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()
