"""Auxiliary losses of MoE routers, as pure functions of routing tensors.

All inputs are float32 router quantities; every function returns a scalar tensor that
carries gradient to the router where the formula allows it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..utils.precision import at_least_float32
from .routing import expert_counts


def load_balancing_loss(probs: Tensor, expert_index: Tensor, num_experts: int) -> Tensor:
    """Switch Transformer load-balancing loss N * sum_i f_i * P_i (Fedus et al. 2021, eq. 4).

    Args:
        probs: (T, E) router probabilities (softmax over experts), float32.
        expert_index: (T, k) experts chosen per token (before any capacity dropping).
        num_experts: E.

    f_i is the fraction of tokens that chose expert i (no gradient), counted over all k slots so
    that sum_i f_i = k, as Mixtral's ``load_balancing_loss_func`` does; P_i is the mean router
    probability of expert i. At perfect balance the value is k; the caller scales it by alpha.
    """
    tokens = probs.shape[0]
    if tokens == 0:
        return probs.sum() * 0.0
    counts = expert_counts(expert_index, num_experts)
    fraction = counts.to(probs.dtype) / tokens
    mean_prob = probs.mean(dim=0)
    return num_experts * torch.sum(fraction * mean_prob)


def router_z_loss(logits: Tensor) -> Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.

    Args:
        logits: (T, E) float32 router logits.
    """
    if logits.shape[0] == 0:
        return logits.sum() * 0.0
    return torch.logsumexp(logits, dim=-1).square().mean()


def cv_squared(values: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation var(v) / mean(v)^2 (Shazeer et al. 2017, eq. 6-7).

    Uses the unbiased variance, as the reference implementation and LLaMA-MoE do. A single
    value has no spread and gives 0.
    """
    values = values.to(at_least_float32(values.dtype))
    if values.numel() <= 1:
        return values.sum() * 0.0
    return values.var() / (values.mean().square() + eps)


def noisy_topk_load(
    clean_logits: Tensor, noisy_logits: Tensor, noise_std: Tensor, top_values: Tensor, k: int
) -> Tensor:
    """Smooth load estimator of noisy top-k gating (Shazeer et al. 2017, appendix A, eq. 8-10).

    load_i = sum_x P(x, i), P(x, i) = Phi((clean_i(x) - threshold_i(x)) / noise_std_i(x)), where the
    threshold is the k-th largest noisy logit among the *other* experts: the (k+1)-th largest when
    expert i is itself among the top k, the k-th largest otherwise.

    Args:
        clean_logits, noisy_logits, noise_std: (T, E) float32.
        top_values: (T, k + 1) the k+1 largest noisy logits per token, descending.
        k: experts kept per token.
    Returns:
        (E,) differentiable expected number of tokens per expert.
    """
    threshold_if_in = top_values[:, k : k + 1]
    threshold_if_out = top_values[:, k - 1 : k]
    is_in = noisy_logits > threshold_if_in
    normal = torch.distributions.Normal(
        torch.zeros((), device=clean_logits.device), torch.ones((), device=clean_logits.device)
    )
    prob_if_in = normal.cdf((clean_logits - threshold_if_in) / noise_std)
    prob_if_out = normal.cdf((clean_logits - threshold_if_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out).sum(dim=0)
