"""Balanced k-means: exact balance, determinism per seed, recovery of planted clusters."""

import torch

from moeforge.convert.methods.kmeans import balanced_kmeans, cluster_sizes, greedy_assign, swap_refine


def test_exactly_balanced_and_deterministic():
    x = torch.randn(96, 10)
    a, _ = balanced_kmeans(x, 8, generator=torch.Generator().manual_seed(3))
    b, _ = balanced_kmeans(x, 8, generator=torch.Generator().manual_seed(3))
    c, _ = balanced_kmeans(x, 8, generator=torch.Generator().manual_seed(4))
    assert torch.bincount(a, minlength=8).tolist() == [12] * 8
    assert torch.equal(a, b)
    assert not torch.equal(a, c)  # another seed, another local optimum (or at least other labels)


def test_recovers_planted_equal_clusters():
    centers = torch.eye(4) * 10
    g = torch.Generator().manual_seed(0)
    x = torch.cat([centers[i] + 0.1 * torch.randn(25, 4, generator=g) for i in range(4)])
    labels, _ = balanced_kmeans(x, 4, generator=torch.Generator().manual_seed(0))
    for i in range(4):  # each planted cluster is exactly one label
        assert labels[i * 25 : (i + 1) * 25].unique().numel() == 1
    assert labels.unique().numel() == 4


def test_uneven_sizes_when_k_does_not_divide():
    x = torch.randn(10, 3)
    labels, _ = balanced_kmeans(x, 3, generator=torch.Generator().manual_seed(0))
    assert sorted(torch.bincount(labels).tolist()) == [3, 3, 4]
    assert cluster_sizes(10, 3) == [4, 3, 3]


def test_swaps_lower_cost_and_keep_sizes():
    cost = torch.rand(40, 4)
    labels = greedy_assign(cost, [10] * 4)
    before = cost[torch.arange(40), labels].sum()
    refined, _ = swap_refine(cost, labels)
    after = cost[torch.arange(40), refined].sum()
    assert after <= before
    assert torch.bincount(refined, minlength=4).tolist() == [10] * 4
