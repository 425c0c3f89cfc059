"""Partition methods: random (IndependentRandom), cluster (IndependentClustering), coactivation.

All three cut the I neurons of the FFN into E + S groups of exactly I / (E + S) neurons; E groups
become routed experts, S groups (if any) always-on shared experts.

* ``random`` -- LLaMA-MoE's IndependentRandom: a seeded permutation cut into equal parts.
* ``cluster`` -- LLaMA-MoE's IndependentClustering / MoEfication's parameter clustering:
  balanced k-means on the L2-normalised rows of W_up (one vector per neuron).
* ``coactivation`` -- MoEfication's co-activation idea on SwiGLU: neuron j is described by its
  contribution magnitude on T calibration tokens, c_j(t) = |a_j(t)| * ||W_down[:, j]||
  (a_j = silu(g_j . x) (u_j . x)), L2-normalised; balanced k-means groups neurons that carry
  output on the same tokens, so a few groups hold most of each token's output.

With shared experts, the S groups whose output is largest on average over the calibration
tokens become the shared experts (``random`` takes the last S groups: no data is needed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import DenseFFN, LayerContext, LayerExperts, experts_from_groups, register_method
from .kmeans import balanced_kmeans


def _finish(ffn: DenseFFN, ctx: LayerContext, groups: list[Tensor], *, shared_by_data: bool) -> LayerExperts:
    cfg = ctx.config
    groups = [g.sort().values for g in groups]
    s = cfg.shared_experts
    if s == 0:
        experts = experts_from_groups(ffn, groups)
    else:
        if shared_by_data:
            order = group_output_ranking(ffn, ctx, groups)
        else:
            order = torch.arange(len(groups) - 1, -1, -1)
        shared_ids = set(order[:s].tolist())
        routed = [g for i, g in enumerate(groups) if i not in shared_ids]
        shared = [groups[i] for i in sorted(shared_ids)]
        experts = experts_from_groups(ffn, routed, shared)
    experts.default_scale = cfg.experts / cfg.top_k
    return experts


def group_output_ranking(ffn: DenseFFN, ctx: LayerContext, groups: list[Tensor]) -> Tensor:
    """Groups ordered by the mean norm of their output on the calibration tokens, largest first."""
    if ctx.calib is None:
        raise RuntimeError("internal error: shared experts from data need calibration")
    act = ctx.calib.activations(ffn)
    down = ffn.down.float()
    means = torch.stack([(act[:, g] @ down[:, g].T).norm(dim=1).mean() for g in groups])
    return means.argsort(descending=True)


@register_method("random")
def random_split(ffn: DenseFFN, ctx: LayerContext) -> LayerExperts:
    """IndependentRandom: shuffle the neurons (seeded) and cut them into E + S equal groups."""
    parts = ctx.config.parts
    perm = torch.randperm(ffn.intermediate_size, generator=ctx.generator)
    return _finish(ffn, ctx, list(perm.chunk(parts)), shared_by_data=False)


def cluster_groups(features: Tensor, parts: int, ctx: LayerContext) -> list[Tensor]:
    """Balanced k-means on L2-normalised ``features`` (I, D): ``parts`` groups of equal size."""
    points = torch.nn.functional.normalize(features.float(), dim=1)
    labels, _ = balanced_kmeans(points, parts, iters=ctx.config.kmeans_iters, generator=ctx.generator)
    return [(labels == j).nonzero(as_tuple=True)[0] for j in range(parts)]


@register_method("cluster")
def cluster_split(ffn: DenseFFN, ctx: LayerContext) -> LayerExperts:
    """IndependentClustering: balanced k-means on normalised W_up rows; gate and down follow."""
    groups = cluster_groups(ffn.up, ctx.config.parts, ctx)
    return _finish(ffn, ctx, groups, shared_by_data=True)


def coactivation_features(ffn: DenseFFN, ctx: LayerContext) -> Tensor:
    """(I, T) contribution magnitudes |a_j(t)| * ||W_down[:, j]|| on the calibration tokens."""
    act = ctx.calib.activations(ffn)
    return (act.abs() * ffn.down.float().norm(dim=0)).T


@register_method("coactivation", needs_calibration=True)
def coactivation_split(ffn: DenseFFN, ctx: LayerContext) -> LayerExperts:
    """Balanced k-means on each neuron's contribution profile over calibration tokens."""
    groups = cluster_groups(coactivation_features(ffn, ctx), ctx.config.parts, ctx)
    return _finish(ffn, ctx, groups, shared_by_data=True)
