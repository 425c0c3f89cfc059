"""Learning-rate schedule: linear warmup, then cosine decay to a floor.

The schedule is a pure function of the step, so resuming needs only the step number
(nothing else about the scheduler has to be saved).
"""

from __future__ import annotations

import math


def lr_at(step: int, *, lr: float, total_steps: int, warmup_steps: int, min_lr_ratio: float) -> float:
    """Learning rate for optimizer step ``step`` (0-based: the rate used by the (step+1)-th update).

    Warmup: lr * (step + 1) / warmup_steps for step < warmup_steps (so the first update is not 0).
    Then cosine from lr at the end of warmup down to ``min_lr_ratio * lr`` at the last step
    (LLaMA-MoE CPT: 100 warmup steps, cosine to 0.1 x lr).
    """
    if warmup_steps > 0 and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    floor = lr * min_lr_ratio
    decay_steps = max(1, total_steps - warmup_steps - 1)
    progress = min(1.0, max(0.0, (step - warmup_steps) / decay_steps))
    return floor + (lr - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lr_schedule(config) -> list[float]:
    """The whole schedule of a :class:`~moeforge.train.config.TrainConfig` (for plots and tests)."""
    return [
        lr_at(s, lr=config.lr, total_steps=config.steps, warmup_steps=config.warmup_steps, min_lr_ratio=config.min_lr_ratio)
        for s in range(config.steps)
    ]
