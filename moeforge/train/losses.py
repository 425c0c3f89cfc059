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


def shifted_targets(labels: Tensor) -> Tensor:
    """Targets aligned with the logits: position t predicts labels[t+1]; the last position predicts nothing.

    Shifting the labels (not the logits) keeps the (B, S, V) logits a view, with no copy.
    """
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


def token_cross_entropy(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Next-token cross-entropy summed per sequence.

    Args:
        logits: (B, S, V) model outputs (any float dtype; computed in float32).
        labels: (B, S) token ids, -100 where no loss is taken.
    Returns:
        (B,) float32 sum of -log p(target) over each sequence's targets, and (B,) target counts.
    """
    b, s, v = logits.shape
    tg = shifted_targets(labels)
    nll = F.cross_entropy(logits.reshape(-1, v).float(), tg.reshape(-1), ignore_index=IGNORE_INDEX, reduction="none")
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
    mask = shifted_targets(labels) != IGNORE_INDEX
    s_logp = F.log_softmax(student_logits[mask].float() / temperature, dim=-1)
    t_logp = F.log_softmax(teacher_logits[mask].float() / temperature, dim=-1)
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
