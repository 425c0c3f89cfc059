"""Partition methods: random (IndependentRandom), cluster (IndependentClustering), coactivation.

All three cut the I neurons of the FFN into E + S groups of exactly I / (E + S) neurons; E groups
become routed experts, S groups (if any) always-on shared experts.

* ``random`` -- LLaMA-MoE's IndependentRandom: a seeded permutation cut into equal parts.
* ``cluster`` -- LLaMA-MoE's IndependentClustering / MoEfication's parameter clustering:
  balanced k-means on the L2-normalised rows of W_up (one vector per neuron).
* ``coactivation`` -- MoEfication's co-activation idea on SwiGLU, then routing-aware refinement.
  Neuron j is described by its contribution magnitude on T calibration tokens,
  c_j(t) = |a_j(t)| * ||W_down[:, j]|| (a_j = silu(g_j . x) (u_j . x)); balanced k-means on the
  L2-normalised profiles groups neurons that carry output on the same tokens. The groups are
  then refined for what routing will actually do (moeforge's addition): each token selects the
  k groups with the largest captured contribution sum_{j in g} c_j(t); neuron j's value for
  group g is the contribution it would deliver there, sum over tokens selecting g of c_j(t);
  neurons move between groups by balance-preserving swaps (:func:`~moeforge.convert.methods.
  kmeans.swap_refine`) and the two steps alternate until no neuron moves. On SmolLM2 (8 experts,
  top-2) this lowers the best-k-groups output error of a layer by a quarter relative to the
  k-means groups alone (``benchmarks/convert_quality.py``).

With shared experts, the S*m neurons with the largest mean contribution over the calibration
tokens become the always-on shared experts and the others are grouped into the E routed experts
(``random`` makes the last S of its E + S random groups shared: no data is needed).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import DenseFFN, LayerContext, LayerExperts, experts_from_groups, register_method
from .kmeans import balanced_kmeans, swap_refine


def _experts(ffn: DenseFFN, ctx: LayerContext, groups: list[Tensor], shared: list[Tensor]) -> LayerExperts:
    experts = experts_from_groups(ffn, [g.sort().values for g in groups], [g.sort().values for g in shared] or None)
    experts.default_scale = ctx.config.experts / ctx.config.active_experts
    return experts


def mean_contribution(ffn: DenseFFN, ctx: LayerContext) -> Tensor:
    """(I,) mean over calibration tokens of |a_j(t)| * ||W_down[:, j]||."""
    if ctx.calib is None:
        raise RuntimeError("internal error: shared experts from data need calibration")
    return (ctx.calib.activations(ffn).abs() * ffn.down.float().norm(dim=0)).mean(0)


def split_shared(ffn: DenseFFN, ctx: LayerContext) -> tuple[Tensor, list[Tensor]]:
    """(routed neuron pool, shared groups): the S*m neurons with the largest mean contribution are
    always on (every token needs them); the rest are left for the routed experts."""
    cfg = ctx.config
    s = cfg.shared_experts
    if s == 0:
        return torch.arange(ffn.intermediate_size), []
    m = cfg.expert_size(ffn.intermediate_size)
    order = mean_contribution(ffn, ctx).argsort(descending=True)
    shared = order[: s * m].sort().values
    return order[s * m :].sort().values, list(shared.chunk(s))


@register_method("random")
def random_split(ffn: DenseFFN, ctx: LayerContext) -> LayerExperts:
    """IndependentRandom: shuffle the neurons (seeded) and cut them into E + S equal groups."""
    cfg = ctx.config
    chunks = list(torch.randperm(ffn.intermediate_size, generator=ctx.generator).chunk(cfg.parts))
    return _experts(ffn, ctx, chunks[: cfg.experts], chunks[cfg.experts :])


def cluster_labels(features: Tensor, parts: int, ctx: LayerContext) -> Tensor:
    """Balanced k-means labels of L2-normalised ``features`` (N, D) into ``parts`` equal groups."""
    points = torch.nn.functional.normalize(features.float(), dim=1)
    labels, _ = balanced_kmeans(points, parts, iters=ctx.config.kmeans_iters, generator=ctx.generator)
    return labels


def _groups(pool: Tensor, labels: Tensor, parts: int) -> list[Tensor]:
    return [pool[labels == j] for j in range(parts)]


@register_method("cluster")
def cluster_split(ffn: DenseFFN, ctx: LayerContext) -> LayerExperts:
    """IndependentClustering: balanced k-means on normalised W_up rows; gate and down follow."""
    pool, shared = split_shared(ffn, ctx)
    labels = cluster_labels(ffn.up[pool], ctx.config.experts, ctx)
    return _experts(ffn, ctx, _groups(pool, labels, ctx.config.experts), shared)


def coactivation_features(ffn: DenseFFN, ctx: LayerContext) -> Tensor:
    """(I, T) contribution magnitudes |a_j(t)| * ||W_down[:, j]|| on the calibration tokens."""
    act = ctx.calib.activations(ffn)
    return (act.abs() * ffn.down.float().norm(dim=0)).T


def routing_aware_refine(contrib: Tensor, labels: Tensor, parts: int, top_k: int, *, iters: int = 20) -> Tensor:
    """Alternate top-k group selection per token and balanced neuron reassignment.

    Args:
        contrib: (T, I) non-negative contribution of each neuron on each calibration token.
        labels: (I,) initial balanced group of each neuron.
        parts: number of groups; top_k: groups each token selects.
    Returns:
        (I,) refined labels with the same group sizes.
    """
    labels = labels.clone()
    for _ in range(iters):
        onehot = torch.nn.functional.one_hot(labels, parts).to(contrib.dtype)  # (I, G)
        captured = contrib @ onehot  # (T, G)
        chosen = torch.zeros_like(captured).scatter_(1, captured.topk(min(top_k, parts), dim=1).indices, 1.0)
        value = contrib.T @ chosen  # (I, G): what neuron j would deliver in group g
        labels, moved = swap_refine(-value, labels)
        if moved == 0:
            break
    return labels


@register_method("coactivation", needs_calibration=True)
def coactivation_split(ffn: DenseFFN, ctx: LayerContext) -> LayerExperts:
    """Balanced k-means on each neuron's contribution profile, refined for top-k routing."""
    cfg = ctx.config
    pool, shared = split_shared(ffn, ctx)
    contrib = coactivation_features(ffn, ctx)[pool]  # (pool, T)
    labels = cluster_labels(contrib, cfg.experts, ctx)
    labels = routing_aware_refine(contrib.T, labels, cfg.experts, cfg.top_k)
    return _experts(ffn, ctx, _groups(pool, labels, cfg.experts), shared)
