"""LLaMA-MoE's neuron-sharing construction (SharingInner, and SharingInter with shared experts).

Importance of neuron j on a sample s (Zhu et al. 2024, sec. 2.2; Molchanov et al. 2019's
first-order Taylor criterion): I_j(s) = |sum_{t in s} a_j(t) dL/da_j(t)|, a_j the input of
down_proj and L the language-modelling loss. The calibration windows are split into E data
clusters (:func:`moeforge.convert.calibration.importance_by_cluster`); expert i's importance
vector is the mean over the windows of cluster i.

* SharingInner (``shared_experts = 0``): expert i takes the m = I/E neurons most important for
  cluster i; experts may share neurons.
* SharingInter (``shared_experts = S``): every cluster nominates its top m neurons (m = I/(E+S));
  the S*m neurons nominated by the most clusters (ties: larger total importance) become the
  always-on shared experts; the other E*m neurons are then dealt to the routed experts without
  overlap, greedily by importance (the highest remaining (expert, neuron) score first, m per
  expert), so the E + S experts partition the FFN (LLaMA-MoE's residual split without neuron
  sharing). LLaMA-MoE picks the shared neurons in several voting rounds; here one round votes.
"""

from __future__ import annotations

import torch

from .base import DenseFFN, LayerContext, LayerExperts, experts_from_groups, register_method


def select_neurons(importance: torch.Tensor, m: int, shared: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Pick neuron sets from (C, I) importance: C routed sets of m, plus ``shared`` sets of m.

    Returns (routed groups, shared groups); indices are sorted within each group.
    """
    c, n = importance.shape
    if shared == 0:
        routed = [importance[i].topk(m).indices.sort().values for i in range(c)]
        return routed, []
    votes = torch.zeros(n)
    for i in range(c):
        votes[importance[i].topk(m).indices] += 1
    total = importance.sum(0)
    # lexicographic (votes, total importance): votes are integers, total is scaled into [0, 1)
    key = votes + total / (total.max() * 2 + 1e-30)
    shared_idx = key.topk(shared * m).indices
    available = torch.ones(n, dtype=torch.bool)
    available[shared_idx] = False
    rest = available.nonzero().squeeze(1)
    if rest.numel() != c * m:
        raise ValueError(f"{n} neurons do not split into {c} routed and {shared} shared groups of {m}")
    owner = deal_without_overlap(importance[:, rest], m)
    routed = [rest[owner == i].sort().values for i in range(c)]
    shared_groups = [g.sort().values for g in shared_idx.sort().values.chunk(shared)]
    return routed, shared_groups


def deal_without_overlap(scores: torch.Tensor, m: int) -> torch.Tensor:
    """(N,) owner of each of N items given (C, N) scores, C * m = N: repeatedly the highest
    remaining (owner, item) score wins, while the owner has room for fewer than m items."""
    c, n = scores.shape
    owner = torch.full((n,), -1, dtype=torch.long)
    room = [m] * c
    left = n
    for flat in scores.flatten().argsort(descending=True, stable=True).tolist():
        i, j = divmod(flat, n)
        if room[i] and owner[j] < 0:
            owner[j] = i
            room[i] -= 1
            left -= 1
            if not left:
                break
    return owner


@register_method("importance", needs_importance=True)
def importance_sharing(ffn: DenseFFN, ctx: LayerContext) -> LayerExperts:
    cfg = ctx.config
    imp = ctx.calib.importance
    if imp is None or imp.shape != (cfg.experts, ffn.intermediate_size):
        raise RuntimeError("internal error: importance scores missing or of the wrong shape")
    m = cfg.expert_size(ffn.intermediate_size)
    routed, shared = select_neurons(imp.float(), m, cfg.shared_experts)
    experts = experts_from_groups(ffn, routed, shared or None)
    experts.default_scale = cfg.experts / cfg.active_experts
    union = torch.unique(torch.cat(routed + shared))
    experts.info["neuron_coverage"] = union.numel() / ffn.intermediate_size
    return experts
