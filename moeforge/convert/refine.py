"""Layer-wise refinement (``--refine``): local distillation of each converted layer.

After construction, layer l's MoE block is trained to reproduce the dense FFN's output on the
calibration tokens' FFN inputs (collected on the dense model's trajectory), one layer at a time,
with no backward pass through the rest of the model:

    min  sum_t || y_t - (s * sum_{e in top-k(x_t)} w_e(x_t) E_e(x_t) + shared(x_t)) ||^2 / sum_t ||y_t||^2

* ``router``: only the router weight (and s when ``--rescale layerwise``) trains. The experts'
  outputs on the calibration tokens are computed once, so a step costs one (T, H) x (H, E)
  product; the top-k choice is discrete, gradients reach the router through the combine weights
  of the selected experts (as in training).
* ``down``: with the routing fixed the block is linear in its down projections, so they are
  refitted in closed form by ridge regression (:func:`refine_down`): the kept neurons learn to
  stand in for the ones a token no longer reaches.
* ``router+down``: ``router``, then ``down`` under the refined routing.
* ``all``: the router and the experts train by gradient descent (mini-batches of 1024 tokens).

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
from ..utils.precision import at_least_float32
from .routing_sim import load_router_state, make_router, relative_error, routed_sum


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
    extra: dict[str, Tensor] | None = None,
) -> RefineResult:
    """Train the router (and optionally the scale) on precomputed expert outputs.

    Full-batch Adam on the first 80% of the calibration tokens; the iterate with the lowest error
    on the last 20% is kept (so refinement never makes the held-out error worse than at the
    start). The router sees standardised inputs x / rms(x) with weight W * rms(x) (identical
    logits), so one learning rate suits layers of any activation scale. Token-choice routers are
    evaluated through per-token Gram terms (:func:`quadratic_terms`), so a step costs one
    (T, H) x (H, E) product. ``extra``: the router's other parameters and buffers as exported
    (:func:`~moeforge.convert.routing_sim.make_router`); they stay fixed.
    """
    feat = x.float().pow(2).mean(0).sqrt().clamp_min(1e-6)
    xs = x.float() / feat
    target = y - shared_out if shared_out is not None else y
    train, held = _split(x.shape[0])
    router = make_router(moe, router_weight.float() * feat, extra)
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
    extra: dict[str, Tensor] | None = None,
) -> tuple[RefineResult, LayerExperts]:
    """Train router, experts and shared experts of one layer: mini-batch Adam on 80% of the tokens.

    The parameters with the lowest error on the held-out 20% (checked every 10 steps and at the
    end) are kept. ``extra`` (the router's other exported state) stays fixed.
    """
    from ..moe.layer import MoELayer

    layer = MoELayer(moe.replace(output_scale=scale)).float()
    load_router_state(layer.router, router_weight, extra)
    with torch.no_grad():
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
    dtype = at_least_float32(experts.gate_up.dtype)  # refitted weights are not rounded to a bf16 source
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


def _activations(experts: LayerExperts, x: Tensor, e: int) -> Tensor:
    m = experts.expert_size
    gu = experts.gate_up[e].float()
    return torch.nn.functional.silu(x @ gu[:m].T) * (x @ gu[m:].T)


def _down_features(moe: MoEConfig, experts: LayerExperts, router_weight: Tensor, scale: float, x: Tensor,
                   extra: dict[str, Tensor] | None = None) -> Tensor:
    """(T, E*m + S*m_s) inputs of the block's down projections, each routed expert's block scaled by s * w."""
    x = x.float()
    m, e_count = experts.expert_size, experts.num_experts
    with torch.no_grad():
        routing = make_router(moe, router_weight, extra)(x, None)
    width = e_count * m + (experts.shared_down.shape[1] if experts.has_shared else 0)
    z = torch.zeros(x.shape[0], width)
    for e in range(e_count):
        sel = routing.expert_index == e
        tokens = routing.token_index[sel]
        if tokens.numel():
            w = routing.weight[sel].detach().float().unsqueeze(1) * scale
            z[tokens, e * m : (e + 1) * m] += w * _activations(experts, x[tokens], e)
    if experts.has_shared:
        a = torch.nn.functional.silu(x @ experts.shared_gate.float().T) * (x @ experts.shared_up.float().T)
        z[:, e_count * m :] = a
    return z


RIDGES = (0.03, 0.1, 0.3, 1.0, 3.0)


def refine_down(
    moe: MoEConfig,
    experts: LayerExperts,
    router_weight: Tensor,
    scale: float,
    x: Tensor,
    y: Tensor,
    *,
    ridges: tuple[float, ...] = RIDGES,
    extra: dict[str, Tensor] | None = None,
) -> tuple[RefineResult, LayerExperts]:
    """Closed-form least-squares refit of every down projection given the routing (``--refine down``).

    With the router and the gate/up projections fixed, the block's output is linear in the down
    projections: y_t ~ D z_t, z_t the concatenation over experts of s * w_e(t) * a_e(t) for the
    experts token t uses (zeros elsewhere) and the shared experts' activations. D (H, E*m + S*m_s)
    is fitted by ridge regression shrunk toward the constructed weights D0,
    D = D0 + (Y - Z D0^T)^T Z (Z^T Z + lambda * mean(diag Z^T Z) I)^-1,
    so the experts that are kept learn to stand in for the neurons a token no longer reaches
    (the reconstruction step of pruning methods such as OBS/SparseGPT, here per expert block).
    lambda is chosen on the held-out 20% of the tokens; the final fit uses all tokens. Cost: one
    (T, I) x (I, I) product and one I x I solve per layer.
    """
    train, held = _split(x.shape[0])
    z = _down_features(moe, experts, router_weight, scale, x, extra)
    m, e_count = experts.expert_size, experts.num_experts
    d0 = torch.cat([experts.down[e].float() for e in range(e_count)], dim=1)
    if experts.has_shared:
        d0 = torch.cat([d0, experts.shared_down.float()], dim=1)
    y = y.float()

    def normal_equations(rows: slice) -> tuple[Tensor, Tensor]:
        zr = z[rows]
        return zr.T @ zr, zr.T @ (y[rows] - zr @ d0.T)

    def solve(gram: Tensor, rhs: Tensor, lam: float) -> Tensor:
        reg = lam * gram.diagonal().mean().clamp_min(1e-12)
        return d0 + torch.linalg.solve(gram + reg * torch.eye(gram.shape[0]), rhs).T

    before = relative_error(y[held], z[held] @ d0.T)
    gram_tr, rhs_tr = normal_equations(train)
    scores = []
    for lam in ridges:
        d = solve(gram_tr, rhs_tr, lam)
        scores.append((relative_error(y[held], z[held] @ d.T), lam))
    best_err, best_lam = min(scores)
    if best_err >= before:  # no improvement on held-out tokens: keep the constructed weights
        return RefineResult(router_weight, scale, before, before, 0), experts
    gram_ho, rhs_ho = normal_equations(held)
    d = solve(gram_tr + gram_ho, rhs_tr + rhs_ho, best_lam)
    dtype = at_least_float32(experts.down.dtype)  # refitted weights are not rounded to a bf16 source
    new = LayerExperts(
        gate_up=experts.gate_up,
        down=torch.stack([d[:, e * m : (e + 1) * m] for e in range(e_count)]).to(dtype).contiguous(),
        shared_gate=experts.shared_gate,
        shared_up=experts.shared_up,
        shared_down=d[:, e_count * m :].to(dtype).contiguous() if experts.has_shared else None,
        groups=experts.groups,
        shared_neurons=experts.shared_neurons,
        router_groups=experts.router_groups,
        default_scale=experts.default_scale,
        info={**experts.info, "down_ridge": best_lam},
    )
    return RefineResult(router_weight, scale, before, best_err, 0), new
