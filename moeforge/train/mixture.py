"""Domain mixture weights: static proportions or Sheared-LLaMA's dynamic batch loading.

Dynamic batch loading (Xia et al. 2024, "Sheared LLaMA", sec. 2.2 and Alg. 1; DoReMi's
exponentiated update, Xie et al. 2023): with current weights w (K domains), per-domain losses l
and reference losses l_ref,

    w' = (1 - c) * softmax(log w + eta * (l - l_ref)) + c / K

Domains whose loss is furthest above their reference gain weight; c mixes in the uniform
distribution so no domain's weight reaches zero. Sheared-LLaMA uses eta = 1, c = 1e-4 and the
reference losses of a target model; for a model converted from a dense one, moeforge's natural
reference is the dense model's own loss on each domain. The paper clips the excess at zero
(max(l - l_ref, 0)); its public code and LLaMA-MoE use the signed difference. Both are offered.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from ..errors import MoeforgeError


def dynamic_update(
    weights: Sequence[float],
    losses: Sequence[float],
    reference: Sequence[float],
    *,
    eta: float = 1.0,
    c: float = 1e-4,
    clip_excess: bool = False,
) -> list[float]:
    """One Sheared-LLaMA update of the domain weights (computed in float64).

    Args:
        weights: (K,) current weights, positive, summing to 1.
        losses: (K,) current per-domain losses.
        reference: (K,) reference per-domain losses.
        eta: step size.
        c: smoothing toward uniform.
        clip_excess: use max(l - l_ref, 0) (the paper) instead of l - l_ref.
    Returns:
        (K,) new weights summing to 1.
    """
    k = len(weights)
    if not (len(losses) == len(reference) == k):
        raise ValueError(f"weights, losses and reference must have the same length, got {k}, {len(losses)}, {len(reference)}")
    w = torch.tensor(list(weights), dtype=torch.float64)
    excess = torch.tensor(list(losses), dtype=torch.float64) - torch.tensor(list(reference), dtype=torch.float64)
    if not torch.isfinite(excess).all():
        raise MoeforgeError(f"dynamic mixture got non-finite losses {list(losses)} (reference {list(reference)}).")
    if clip_excess:
        excess = excess.clamp_min(0.0)
    new = (1.0 - c) * torch.softmax(torch.log(w) + eta * excess, dim=0) + c / k
    new = new / new.sum()
    return new.tolist()


class Mixture:
    """The current domain weights and, for ``dynamic``, the rule that moves them.

    ``history`` keeps (step, weights) after every change, for metrics and plots.
    """

    def __init__(self, names: list[str], weights: list[float], config) -> None:
        if len(names) != len(weights):
            raise ValueError("names and weights differ in length")
        total = float(sum(weights))
        if not math.isfinite(total) or total <= 0 or any(w < 0 for w in weights):
            raise MoeforgeError(f"mixture weights must be >= 0 and sum to > 0, got {weights}.")
        self.names = list(names)
        self.weights = [w / total for w in weights]
        self.config = config
        self.reference: list[float] | None = None

    @property
    def dynamic(self) -> bool:
        return self.config.type == "dynamic"

    def due(self, step: int) -> bool:
        """True when a dynamic update should run after optimizer step ``step`` (1-based)."""
        return self.dynamic and step % self.config.update_every == 0

    def set_reference(self, losses: dict[str, float]) -> None:
        missing = [n for n in self.names if n not in losses]
        if missing:
            raise MoeforgeError(f"reference losses lack domains {missing}.")
        self.reference = [float(losses[n]) for n in self.names]

    def update(self, losses: dict[str, float]) -> list[float]:
        """Apply :func:`dynamic_update` with per-domain ``losses``; domains without a loss keep their excess at 0."""
        if self.reference is None:
            raise MoeforgeError("dynamic mixture has no reference losses; this is a bug in the caller.")
        current = [float(losses.get(n, ref)) for n, ref in zip(self.names, self.reference)]
        # a domain without a measurement this round (no samples) is treated as at its reference
        # but must not be zeroed: with zero weight, log w is -inf
        weights = [max(w, 1e-12) for w in self.weights]
        self.weights = dynamic_update(
            weights, current, self.reference, eta=self.config.eta, c=self.config.c, clip_excess=self.config.clip_excess
        )
        return self.weights

    def as_dict(self) -> dict[str, float]:
        return dict(zip(self.names, self.weights))

    def state_dict(self) -> dict:
        return {"names": self.names, "weights": self.weights, "reference": self.reference}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise MoeforgeError(
                f"checkpoint's data domains {state['names']} differ from the config's {self.names}; "
                "resume with the same data sources or use a new output_dir."
            )
        self.weights = list(state["weights"])
        self.reference = None if state["reference"] is None else list(state["reference"])
