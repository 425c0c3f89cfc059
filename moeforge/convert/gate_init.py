"""Router initialisation (``--gate-init``): the (E, H) float32 router weight of a converted layer.

* ``random``: N(0, 0.02^2) rows (the initializer range of LLaMA-family configs); logits start
  small, so routing is close to uniform. Experts in one virtual group (granular upcycling)
  share a row (Megatron-LM's virtual-group initialisation).
* ``uniform``: all zeros: every expert gets the same probability, so the renormalised top-k
  weights are exactly 1/k (ties in the top-k choice go to the lowest expert index, so this is
  for k = E, for degenerate checks, or as a start for noisy/trained routing).
* ``centroid``: expert e's row is the normalised mean of the unit gate_proj rows of its neurons
  (the "keys" whose positive projection opens a SwiGLU neuron), so a token is sent to the experts
  whose neurons it would activate. Rows are scaled so that each logit has unit standard
  deviation under the layer's RMSNorm weights. Needs a split method.
* ``activation``: fitted on calibration tokens to predict which experts carry the largest share
  of the dense FFN output, in the spirit of MoEfication's router training (Zhang et al. 2022):
  the target of token t is the centred log share of each expert's output norm,
  z_e(t) = log(||E_e(x_t)|| / sum_f ||E_f(x_t)||) - mean_f(...), and the router is the ridge
  regression W = argmin sum_t ||W x_t - z(t)||^2 + lambda ||W||^2 (closed form, lambda = 1e-3 x
  the mean diagonal of X^T X), so its top-k logits name the experts with the largest outputs.
  The caller then picks the temperature (:mod:`moeforge.convert.layer`). Needs a split method.
* ``domain`` (``--method merge``): each expert model comes with a text of its domain
  (``--expert-data``), and the router is the multinomial logistic regression that predicts from
  a token's FFN input which text it came from, W = argmin mean_t CE(softmax(W x_t), d_t) +
  lambda ||W||^2 (classes weighted to equal total weight, L-BFGS from zero), so tokens of
  expert e's domain pick expert e. mergekit-moe's "hidden" gate mode sets each row to the mean
  hidden state of the expert's prompts instead; a fitted classifier also uses what tells the
  domains apart rather than what they share.

Both data-free and data-driven rows are combined with the layer's scale policy by the caller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import MoeforgeError
from .methods.base import DenseFFN, LayerContext, LayerExperts

RANDOM_STD = 0.02


def random_rows(experts: LayerExperts, hidden: int, generator: torch.Generator, std: float = RANDOM_STD) -> Tensor:
    e = experts.num_experts
    groups = experts.router_groups if experts.router_groups is not None else torch.arange(e)
    base = torch.randn(int(groups.max()) + 1, hidden, generator=generator) * std
    return base[groups].clone()


def centroid_rows(experts: LayerExperts, ffn: DenseFFN, norm_weight: Tensor) -> Tensor:
    """Normalised mean of each expert's unit gate rows, scaled to unit logit std under ``norm_weight``."""
    if experts.groups is None:
        raise MoeforgeError("centroid router initialisation needs experts made of neuron groups (a split method).")
    gate = F.normalize(ffn.gate.float(), dim=1)
    rows = torch.stack([F.normalize(gate[g].mean(0), dim=0) for g in experts.groups])
    std = (rows.pow(2) * norm_weight.float().pow(2)).sum(1).sqrt().clamp_min(1e-12)
    return rows / std.unsqueeze(1)


def expert_share_targets(expert_out: Tensor) -> Tensor:
    """(T, E, H) expert outputs -> (T, E) distribution of output norms per token."""
    norms = expert_out.norm(dim=-1)
    return norms / norms.sum(-1, keepdim=True).clamp_min(1e-30)


def fit_router(x: Tensor, targets: Tensor, *, ridge: float = 1e-3) -> Tensor:
    """Least-squares router: (E, H) W minimising sum_t ||W x_t - z_t||^2 + lambda ||W||^2.

    x: (T, H) router inputs; targets: (T, E) shares (rows sum to 1), turned into centred log
    shares z. lambda = ``ridge`` x mean diagonal of X^T X. Returns float32 W.
    """
    x = x.float()
    z = torch.log(targets.float().clamp_min(1e-6))
    z = z - z.mean(dim=1, keepdim=True)
    gram = x.T @ x
    gram += ridge * gram.diagonal().mean().clamp_min(1e-12) * torch.eye(gram.shape[0])
    return torch.linalg.solve(gram, x.T @ z).T.contiguous()


DOMAIN_L2 = 1e-4
DOMAIN_STEPS = 100


def domain_rows(x: Tensor, labels: Tensor, num_experts: int, *, l2: float = DOMAIN_L2,
                steps: int = DOMAIN_STEPS) -> tuple[Tensor, float]:
    """Router rows fitted to tell the experts' domains apart: ((E, H) float32 W, training accuracy).

    x: (T, H) router inputs (FFN inputs on the calibration text); labels: (T,) long expert of each
    token. Multinomial logistic regression without bias, L2 penalty ``l2`` on W in units of the
    inputs' RMS, classes weighted by T / (E * count) so a longer text does not dominate.
    """
    x = x.float()
    rms = x.pow(2).mean().sqrt().clamp_min(1e-12)
    xs = x / rms
    counts = torch.bincount(labels, minlength=num_experts).float()
    if bool((counts == 0).any()):
        missing = [i for i, c in enumerate(counts.tolist()) if c == 0]
        raise MoeforgeError(f"--gate-init domain: expert(s) {missing} have no calibration tokens; give each a text.")
    class_weight = labels.numel() / (num_experts * counts)
    w = torch.zeros(num_experts, x.shape[1], requires_grad=True)
    opt = torch.optim.LBFGS([w], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe",
                            tolerance_grad=1e-7, tolerance_change=1e-9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(xs @ w.T, labels, weight=class_weight) + l2 * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    rows = (w.detach() / rms).contiguous()
    accuracy = float(((x @ rows.T).argmax(1) == labels).float().mean())
    return rows, accuracy


def init_router(
    name: str,
    experts: LayerExperts,
    ffn: DenseFFN,
    ctx: LayerContext,
    *,
    norm_weight: Tensor,
    expert_out: Tensor | None = None,
    info: dict | None = None,
) -> Tensor:
    """The initial (E, H) float32 router weight for ``--gate-init name``.

    ``expert_out`` (T, E, H), the experts' outputs on ``ctx.calib.x``, is required for
    ``activation`` (the caller computes it once and reuses it for rescaling and refinement).
    ``info``: the layer report's dict, given ``domain_accuracy`` by ``domain``.
    """
    hidden = ffn.hidden_size
    if name == "random":
        std = ctx.config.router_options.get("router_init_std")
        return random_rows(experts, hidden, ctx.generator, RANDOM_STD if std is None else float(std))
    if name == "uniform":
        return torch.zeros(experts.num_experts, hidden)
    if name == "centroid":
        return centroid_rows(experts, ffn, norm_weight)
    if name == "activation":
        if ctx.calib is None or expert_out is None:
            raise RuntimeError("internal error: activation gate init needs calibration data")
        if experts.groups is None:
            raise MoeforgeError("activation router initialisation needs experts made of neuron groups (a split method).")
        return fit_router(ctx.calib.x, expert_share_targets(expert_out))
    if name == "domain":
        if ctx.calib is None or ctx.calib.labels is None:
            raise RuntimeError("internal error: domain gate init needs labelled calibration data")
        rows, accuracy = domain_rows(ctx.calib.x, ctx.calib.labels, experts.num_experts)
        if info is not None:
            info["domain_accuracy"] = accuracy
        return rows
    raise MoeforgeError(f"unknown gate init {name!r}")
