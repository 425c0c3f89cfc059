"""Layer-wise refinement (``--refine``): local distillation of each converted layer.

After construction, layer l's MoE block is trained to reproduce the dense FFN's output on the
calibration tokens' FFN inputs (collected on the dense model's trajectory), one layer at a time,
with no backward pass through the rest of the model:

    min  sum_t || y_t - (s * sum_{e in top-k(x_t)} w_e(x_t) E_e(x_t) + shared(x_t)) ||^2 / sum_t ||y_t||^2

* ``router``: only the router weight (and s when ``--rescale layerwise``) trains. The experts'
  outputs on the calibration tokens are computed once, so a step costs one (T, H) x (H, E)
  product; the top-k choice is discrete, gradients reach the router through the combine weights
  of the selected experts (as in training).
* ``all``: the experts train too (mini-batches of 1024 tokens), which moves the experts away
  from their dense slices toward what the router sends them.

MoEfication (Zhang et al. 2022) trains its routers on FFN inputs in the same local way; here the
loss is the layer's output error itself rather than an expert-selection classification.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from ..moe.config import MoEConfig
from .methods.base import LayerExperts
from .routing_sim import make_router, relative_error, routed_sum


@dataclass
class RefineResult:
    router: Tensor
    scale: float
    error_before: float
    error_after: float
    steps: int


def refine_router(
    moe: MoEConfig,
    router_weight: Tensor,
    scale: float,
    x: Tensor,
    y: Tensor,
    expert_out: Tensor,
    shared_out: Tensor | None,
    *,
    steps: int,
    lr: float = 1e-2,
    train_scale: bool = False,
) -> RefineResult:
    """Train the router (and optionally the scale) on precomputed expert outputs, full batch.

    The router sees standardised inputs x / rms(x) with weight W * rms(x) (identical logits), so
    one learning rate suits layers of any activation scale. The best iterate is kept.
    """
    feat = x.float().pow(2).mean(0).sqrt().clamp_min(1e-6)
    xs = x.float() / feat
    router = make_router(moe, router_weight.float() * feat).train(False)
    router.weight.requires_grad_(True)
    log_s = torch.tensor(math.log(scale), requires_grad=train_scale)
    opt = torch.optim.Adam([router.weight] + ([log_s] if train_scale else []), lr=lr)
    base = shared_out if shared_out is not None else torch.zeros_like(y)
    denom = (y * y).sum()

    def loss_fn() -> Tensor:
        out = torch.exp(log_s) * routed_sum(moe, router.weight, xs, expert_out, router=router) + base
        return ((y - out) ** 2).sum() / denom

    with torch.no_grad():
        before = float(loss_fn())
    best = (before, router.weight.detach().clone(), float(log_s))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = loss_fn()
        if float(loss) < best[0]:
            best = (float(loss), router.weight.detach().clone(), float(log_s))
        loss.backward()
        opt.step()
    with torch.no_grad():
        router.weight.copy_(best[1])
        log_s.fill_(best[2])
        after = float(loss_fn())
    return RefineResult((best[1] / feat).contiguous(), math.exp(best[2]), before, after, steps)


def refine_all(
    moe: MoEConfig,
    experts: LayerExperts,
    router_weight: Tensor,
    scale: float,
    x: Tensor,
    y: Tensor,
    *,
    steps: int,
    lr: float = 1e-4,
    batch_tokens: int = 1024,
    generator: torch.Generator,
) -> tuple[RefineResult, LayerExperts]:
    """Train router and experts (and shared experts) of one layer on (x, y), mini-batch Adam."""
    from ..moe.layer import MoELayer

    layer = MoELayer(moe.replace(output_scale=scale)).float()
    with torch.no_grad():
        layer.router.weight.copy_(router_weight)
        layer.experts.gate_up_proj.copy_(experts.gate_up.float())
        layer.experts.down_proj.copy_(experts.down.float())
        if experts.has_shared:
            layer.shared_experts.gate_proj.weight.copy_(experts.shared_gate.float())
            layer.shared_experts.up_proj.weight.copy_(experts.shared_up.float())
            layer.shared_experts.down_proj.weight.copy_(experts.shared_down.float())
    layer.eval()  # no router noise or aux losses: distil the inference behaviour

    def full_error() -> float:
        with torch.no_grad():
            out = torch.cat([layer(x[i : i + 4096]).hidden_states for i in range(0, x.shape[0], 4096)])
        return relative_error(y, out)

    before = full_error()
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=lr)
    t = x.shape[0]
    for _ in range(steps):
        idx = torch.randint(t, (min(batch_tokens, t),), generator=generator)
        opt.zero_grad(set_to_none=True)
        out = layer(x[idx]).hidden_states
        loss = ((y[idx] - out) ** 2).sum() / (y[idx] ** 2).sum()
        loss.backward()
        opt.step()
    after = full_error()
    dtype = experts.gate_up.dtype
    with torch.no_grad():
        new = LayerExperts(
            gate_up=layer.experts.gate_up_proj.detach().to(dtype).clone(),
            down=layer.experts.down_proj.detach().to(dtype).clone(),
            groups=experts.groups,
            shared_neurons=experts.shared_neurons,
            router_groups=experts.router_groups,
            default_scale=experts.default_scale,
            info=dict(experts.info),
        )
        if experts.has_shared:
            new.shared_gate = layer.shared_experts.gate_proj.weight.detach().to(dtype).clone()
            new.shared_up = layer.shared_experts.up_proj.weight.detach().to(dtype).clone()
            new.shared_down = layer.shared_experts.down_proj.weight.detach().to(dtype).clone()
    result = RefineResult(layer.router.weight.detach().float().clone(), scale, before, after, steps)
    return result, new
