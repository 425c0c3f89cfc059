"""Evaluate a candidate MoE layer on calibration tokens from precomputed expert outputs.

Data-driven steps (router initialisation, rescaling, refinement) compare the MoE layer's
output with the dense FFN's on the same tokens many times; running the experts once and
combining their stored outputs under each candidate router is much cheaper than rerunning the
layer. Routing goes through the real router class from :data:`moeforge.moe.ROUTERS` (eval
mode), so the simulation is the layer's own inference behaviour.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..moe.config import MoEConfig
from ..moe.routers import build_router


def make_router(moe: MoEConfig, weight: Tensor, extra: dict[str, Tensor] | None = None):
    """An eval-mode router of ``moe.router`` type with ``weight`` (E, H) (float32) and its other
    parameters and buffers from ``extra`` (the state the export writes, e.g. noisy top-k's
    ``router_mlp`` matrix; without it they take a fresh random init, unlike the exported layer)."""
    router = build_router(moe)
    load_router_state(router, weight, extra)
    return router.eval()


def load_router_state(router, weight: Tensor, extra: dict[str, Tensor] | None = None) -> None:
    """Give ``router`` the (E, H) ``weight`` (as float32) and its other exported state ``extra``;
    what ``extra`` does not name keeps its current value."""
    router.load_state_dict({**router.state_dict(), **(extra or {}), "weight": weight.float()})


def routed_sum(moe: MoEConfig, weight: Tensor, x: Tensor, expert_out: Tensor, router=None,
               extra: dict[str, Tensor] | None = None) -> Tensor:
    """sum over each token's routed pairs of w * E_e(x), unscaled.

    Args:
        moe: the layer's MoE config (router type, k, renormalisation).
        weight: (E, H) router weight (ignored when ``router`` is given).
        x: (T, H) router inputs.
        expert_out: (T, E, H) every expert's output on x.
        router: an existing router module (for gradient-based refinement).
        extra: the router's other exported state (:func:`make_router`); ignored with ``router``.
    Returns:
        (T, H); differentiable w.r.t. the router's weight when ``router`` requires grad.
    """
    router = router if router is not None else make_router(moe, weight, extra)
    routing = router(x.float(), None)
    vals = expert_out[routing.token_index, routing.expert_index] * routing.weight.unsqueeze(-1)
    out = torch.zeros(x.shape[0], expert_out.shape[-1], dtype=vals.dtype)
    return out.index_add(0, routing.token_index, vals)


def relative_error(y: Tensor, y_hat: Tensor) -> float:
    """||y - y_hat||^2 / ||y||^2 summed over tokens."""
    return float(((y - y_hat) ** 2).sum() / (y**2).sum().clamp_min(1e-30))
