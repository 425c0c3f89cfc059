"""Training losses: next-token cross-entropy, router aux losses, KL distillation from a teacher.

All functions return *sums* per sequence (not means), so the trainer can normalise by the
number of target tokens in the whole global batch: with gradient accumulation and any number
of processes, the gradient is that of one big batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.chat import IGNORE_INDEX


def shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Align position t's logits with token t+1: (B, S-1, V) logits and (B, S-1) targets."""
    return logits[:, :-1, :], labels[:, 1:]


def token_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy summed per sequence.

    Args:
        logits: (B, S, V) model outputs (any float dtype; computed in float32).
        labels: (B, S) token ids, -100 where no loss is taken.
    Returns:
        (B,) float32 sum of -log p(target) over each sequence's targets, and (B,) target counts.
    """
    lg, tg = shifted(logits, labels)
    b, s, v = lg.shape
    nll = F.cross_entropy(lg.reshape(-1, v).float(), tg.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
    mask = tg != IGNORE_INDEX
    return nll.view(b, s).sum(dim=1), mask.sum(dim=1)


def distillation_kl(student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0) -> Tensor:
    """KL(p_teacher || p_student) at temperature T, times T^2, summed per sequence over target positions.

    Hinton et al. (2015), "Distilling the Knowledge in a Neural Network": soft targets at
    temperature T; the T^2 factor keeps gradient magnitudes comparable across temperatures.

    Args:
        student_logits, teacher_logits: (B, S, V); the vocabularies must match.
        labels: (B, S), -100 where no loss is taken (those positions are skipped).
    Returns:
        (B,) float32.
    """
    s_lg, tg = shifted(student_logits, labels)
    t_lg, _ = shifted(teacher_logits, labels)
    mask = tg != IGNORE_INDEX
    s_logp = F.log_softmax(s_lg[mask].float() / temperature, dim=-1)
    t_logp = F.log_softmax(t_lg[mask].float() / temperature, dim=-1)
    per_token = F.kl_div(s_logp, t_logp, log_target=True, reduction="none").sum(-1) * temperature**2
    out = torch.zeros(mask.shape, dtype=per_token.dtype, device=per_token.device)
    out[mask] = per_token
    return out.sum(dim=1)


def weighted_aux_loss(output, scale: float = 1.0, scales: dict[str, float] | None = None) -> tuple[Tensor | None, dict[str, Tensor]]:
    """The router aux losses of a model output, re-weighted by the trainer's multipliers.

    ``output.aux_losses`` (name -> scalar, already multiplied by each router's own coefficient
    and summed over layers) is multiplied by ``scale * scales.get(name, 1)``. Models without aux
    losses (dense models) give ``(None, {})``.

    Returns:
        (total, {name: weighted value}); total carries gradient.
    """
    scales = scales or {}
    named = getattr(output, "aux_losses", None) or {}
    if named:
        weighted = {k: v.float() * (scale * scales.get(k, 1.0)) for k, v in named.items()}
        total = torch.stack(list(weighted.values())).sum()
        return total, weighted
    total = getattr(output, "aux_loss", None)
    if total is None:
        return None, {}
    total = total.float() * scale
    return total, {"aux_loss": total}
