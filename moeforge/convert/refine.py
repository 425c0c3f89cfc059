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
    """Refined router and scale; errors are relative squared errors on the held-out 20% of tokens."""

    router: Tensor
    scale: float
    error_before: float
    error_after: float
    steps: int
    train_before: float | None = None


def _split(t: int) -> tuple[slice, slice]:
    """Calibration tokens for training (first 80%) and for choosing the best iterate (last 20%)."""
    cut = max(1, int(t * 0.8))
    return slice(0, cut), slice(cut, t) if cut < t else slice(0, t)


def quadratic_terms(expert_out: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-token Gram terms that make the routed error cheap to evaluate for any router.

    For token t, routed output s * sum_k w_k o_{t,e_k} and residual target r_t:
    ||r_t - s sum_k w_k o_k||^2 = ||r_t||^2 - 2 s sum_k w_k b_{t,e_k} + s^2 sum_{k,l} w_k w_l G_{t,e_k,e_l}
    with b = o r (T, E) and G = o o^T (T, E, E). Returns (||r||^2 (T,), b, G).
    """
    b = torch.einsum("teh,th->te", expert_out, target)
    gram = torch.einsum("teh,tfh->tef", expert_out, expert_out)
    return target.pow(2).sum(-1), b, gram


def quadratic_error(routing, scale: Tensor, r2: Tensor, b: Tensor, gram: Tensor) -> Tensor:
    """Summed squared error of a token-choice routing (``routing.slots`` set) from the Gram terms."""
    idx, w = routing.topk_view()  # (T, k)
    bk = b.gather(1, idx)
    gk = gram.gather(1, idx.unsqueeze(-1).expand(-1, -1, gram.shape[2])).gather(2, idx.unsqueeze(1).expand(-1, idx.shape[1], -1))
    lin = (w * bk).sum(-1)
    quad = torch.einsum("tk,tkl,tl->t", w, gk, w)
    return (r2 - 2 * scale * lin + scale * scale * quad).sum()


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
    lr: float = 3e-3,
    train_scale: bool = False,
) -> RefineResult:
    """Train the router (and optionally the scale) on precomputed expert outputs.

    Full-batch Adam on the first 80% of the calibration tokens; the iterate with the lowest error
    on the last 20% is kept (so refinement never makes the held-out error worse than at the
    start). The router sees standardised inputs x / rms(x) with weight W * rms(x) (identical
    logits), so one learning rate suits layers of any activation scale. Token-choice routers are
    evaluated through per-token Gram terms (:func:`quadratic_terms`), so a step costs one
    (T, H) x (H, E) product.
    """
    feat = x.float().pow(2).mean(0).sqrt().clamp_min(1e-6)
    xs = x.float() / feat
    target = y - shared_out if shared_out is not None else y
    train, held = _split(x.shape[0])
    router = make_router(moe, router_weight.float() * feat)
    router.weight.requires_grad_(True)
    log_s = torch.tensor(math.log(scale), requires_grad=train_scale)
    opt = torch.optim.Adam([router.weight] + ([log_s] if train_scale else []), lr=lr)
    probe = router(xs[:2], None)
    gram_path = probe.slots is not None
    terms = {}
    for name, part in (("train", train), ("held", held)):
        if gram_path:
            terms[name] = quadratic_terms(expert_out[part], target[part])
        terms[name + "_den"] = (y[part] ** 2).sum()

    def error(part_name: str, part: slice) -> Tensor:
        s = torch.exp(log_s)
        if gram_path:
            routing = router(xs[part], None)
            err = quadratic_error(routing, s, *terms[part_name])
        else:
            out = s * routed_sum(moe, router.weight, xs[part], expert_out[part], router=router)
            err = ((target[part] - out) ** 2).sum()
        return err / terms[part_name + "_den"]

    with torch.no_grad():
        start_train = float(error("train", train))
        start_held = float(error("held", held))
    best = (start_held, router.weight.detach().clone(), float(log_s.detach()))
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = error("train", train)
        loss.backward()
        opt.step()
        with torch.no_grad():
            held_err = float(error("held", held))
        if held_err < best[0]:
            best = (held_err, router.weight.detach().clone(), float(log_s.detach()))
    with torch.no_grad():
        router.weight.copy_(best[1])
        log_s.fill_(best[2])
    return RefineResult((best[1] / feat).contiguous(), math.exp(best[2]), start_held, best[0], steps,
                        train_before=start_train)


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
    """Train router, experts and shared experts of one layer: mini-batch Adam on 80% of the tokens.

    The parameters with the lowest error on the held-out 20% (checked every 10 steps and at the
    end) are kept.
    """
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
    train, held = _split(x.shape[0])
    x_tr, y_tr, x_ho, y_ho = x[train], y[train], x[held], y[held]

    def held_error() -> float:
        with torch.no_grad():
            out = torch.cat([layer(x_ho[i : i + 4096]).hidden_states for i in range(0, x_ho.shape[0], 4096)])
        return relative_error(y_ho, out)

    def snapshot() -> dict[str, Tensor]:
        return {k: v.detach().clone() for k, v in layer.state_dict().items()}

    before = held_error()
    best = (before, snapshot())
    opt = torch.optim.Adam([p for p in layer.parameters() if p.requires_grad], lr=lr)
    t = x_tr.shape[0]
    for step in range(1, steps + 1):
        idx = torch.randint(t, (min(batch_tokens, t),), generator=generator)
        opt.zero_grad(set_to_none=True)
        out = layer(x_tr[idx]).hidden_states
        loss = ((y_tr[idx] - out) ** 2).sum() / (y_tr[idx] ** 2).sum()
        loss.backward()
        opt.step()
        if step % 10 == 0 or step == steps:
            err = held_error()
            if err < best[0]:
                best = (err, snapshot())
    layer.load_state_dict(best[1])
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
    result = RefineResult(layer.router.weight.detach().float().clone(), scale, before, best[0], steps)
    return result, new
