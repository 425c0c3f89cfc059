"""Balanced k-means: k clusters of prescribed sizes (exactly equal when k divides N).

LLaMA-MoE's IndependentClustering (and MoEfication before it) clusters FFN neurons with a
k-means whose clusters all have the same size, so that every expert gets the same width.

Algorithm (deterministic for a seed):

1. k-means++ initialisation (Arthur & Vassilvitskii 2007) with a seeded generator.
2. Assignment under capacities: a greedy pass over all (point, cluster) pairs in increasing
   squared distance, each point taking the closest cluster with room left, followed by pairwise
   swaps: for every cluster pair (a, b), points of a that would rather be in b are exchanged
   with points of b that would rather be in a, best gains first, while the exchange lowers the
   total cost. Swaps keep the sizes, so the balance is exact.
3. Centroids move to the mean of their points; later iterations start from the previous
   labels and only swap, until no label changes or ``iters`` is reached.

The result is a local optimum of the balanced k-means objective (sum of squared distances).
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor


def cluster_sizes(n: int, k: int) -> list[int]:
    """Sizes of k balanced clusters of n points (the first n mod k clusters get one more)."""
    return [n // k + (1 if i < n % k else 0) for i in range(k)]


def _sq_dist(points: Tensor, centroids: Tensor, p2: Tensor | None = None) -> Tensor:
    """(N, k) squared Euclidean distances; ``p2`` (N, 1) are the points' squared norms if known."""
    if p2 is None:
        p2 = (points * points).sum(1, keepdim=True)
    c2 = (centroids * centroids).sum(1)
    return (p2 - 2.0 * (points @ centroids.T) + c2).clamp_min_(0.0)


def kmeans_pp_init(points: Tensor, k: int, generator: torch.Generator, p2: Tensor | None = None) -> Tensor:
    """k-means++ seeding: (k, D) centroids drawn from ``points``."""
    n = points.shape[0]
    if p2 is None:
        p2 = (points * points).sum(1, keepdim=True)
    first = int(torch.randint(n, (1,), generator=generator))
    chosen = [first]
    d2 = _sq_dist(points, points[first : first + 1], p2).squeeze(1)
    for _ in range(1, k):
        total = float(d2.sum())
        if total <= 0:
            idx = int(torch.randint(n, (1,), generator=generator))
        else:
            idx = int(torch.multinomial(d2 / total, 1, generator=generator))
        chosen.append(idx)
        d2 = torch.minimum(d2, _sq_dist(points, points[idx : idx + 1], p2).squeeze(1))
    return points[chosen].clone()


def greedy_assign(cost: Tensor, sizes: list[int]) -> Tensor:
    """Assign each row of ``cost`` (N, k) to a column, column j receiving exactly sizes[j] rows.

    Pairs are visited in increasing cost; a row takes the first column that still has room.
    """
    n, k = cost.shape
    order = np.argsort(cost.numpy().ravel(), kind="stable")
    labels = np.full(n, -1, dtype=np.int64)
    room = np.array(sizes, dtype=np.int64)
    remaining = n
    rows, cols = np.divmod(order, k)
    for r, c in zip(rows.tolist(), cols.tolist()):
        if labels[r] < 0 and room[c] > 0:
            labels[r] = c
            room[c] -= 1
            remaining -= 1
            if remaining == 0:
                break
    return torch.from_numpy(labels)


def swap_refine(cost: Tensor, labels: Tensor, max_rounds: int = 50) -> tuple[Tensor, int]:
    """Improve a capacity-respecting assignment by pairwise exchanges; sizes never change.

    Returns (labels, number of exchanged pairs).
    """
    labels = labels.clone()
    k = cost.shape[1]
    swaps = 0
    for _ in range(max_rounds):
        changed = 0
        for a in range(k):
            for b in range(a + 1, k):
                in_a = (labels == a).nonzero(as_tuple=True)[0]
                in_b = (labels == b).nonzero(as_tuple=True)[0]
                if in_a.numel() == 0 or in_b.numel() == 0:
                    continue
                gain_a = cost[in_a, a] - cost[in_a, b]  # saved by moving a-point to b
                gain_b = cost[in_b, b] - cost[in_b, a]
                ga, ia = gain_a.sort(descending=True)
                gb, ib = gain_b.sort(descending=True)
                m = min(ga.numel(), gb.numel())
                total = ga[:m] + gb[:m]
                good = int((total > 1e-9).sum())  # sorted gains: the good pairs form a prefix
                if good:
                    labels[in_a[ia[:good]]] = b
                    labels[in_b[ib[:good]]] = a
                    changed += good
        swaps += changed
        if not changed:
            break
    return labels, swaps


def balanced_kmeans(
    points: Tensor,
    k: int,
    *,
    iters: int = 20,
    generator: torch.Generator | None = None,
    sizes: list[int] | None = None,
) -> tuple[Tensor, Tensor]:
    """Cluster ``points`` (N, D) into k clusters of the given ``sizes`` (default: balanced).

    Returns:
        labels: (N,) long, cluster of each point; cluster j holds exactly sizes[j] points.
        centroids: (k, D) float32 cluster means.
    """
    points = points.float()
    n = points.shape[0]
    sizes = sizes or cluster_sizes(n, k)
    if sum(sizes) != n or len(sizes) != k:
        raise ValueError(f"cluster sizes {sizes} do not partition {n} points into {k} clusters")
    generator = generator if generator is not None else torch.Generator().manual_seed(0)
    p2 = (points * points).sum(1, keepdim=True)
    centroids = kmeans_pp_init(points, k, generator, p2)
    labels = greedy_assign(_sq_dist(points, centroids, p2), sizes)
    for _ in range(iters):
        centroids = _centroids(points, labels, k, centroids)
        new_labels, swaps = swap_refine(_sq_dist(points, centroids, p2), labels)
        if swaps == 0:
            break
        labels = new_labels
    centroids = _centroids(points, labels, k, centroids)
    return labels, centroids


def _centroids(points: Tensor, labels: Tensor, k: int, previous: Tensor) -> Tensor:
    """Cluster means as one (k, N) x (N, D) product; an empty cluster keeps its previous centroid."""
    onehot = torch.nn.functional.one_hot(labels, k).to(points.dtype).T  # (k, N)
    counts = onehot.sum(1, keepdim=True)
    sums = onehot @ points
    return torch.where(counts > 0, sums / counts.clamp_min(1), previous)
