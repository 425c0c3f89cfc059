"""Routing statistics over hand-made routings against values worked out by hand."""

import math

import pytest
import torch

from moeforge.analysis.stats import (
    RoutingStats,
    coefficient_of_variation,
    domain_expert_mutual_information,
    dropped_tokens,
    expert_load,
    layer_stats,
    load_entropy,
    router_entropy,
    specialisation,
    token_assignments,
)
from moeforge.moe import MoEConfig, MoELayer, Routing
from moeforge.moe.routing import token_choice

LN2 = math.log(2)


def hand_routing() -> Routing:
    """5 tokens, 4 experts, top-2. Pairs per expert: e0 5, e1 3, e2 1, e3 1 (10 pairs)."""
    index = torch.tensor([[0, 1], [0, 2], [0, 1], [3, 0], [1, 0]])
    weight = torch.tensor([[0.7, 0.3], [0.6, 0.4], [0.5, 0.5], [0.9, 0.1], [0.8, 0.2]])
    probs = torch.tensor([
        [1.0, 0.0, 0.0, 0.0],      # entropy 0
        [0.25, 0.25, 0.25, 0.25],  # ln 4
        [0.5, 0.5, 0.0, 0.0],      # ln 2
        [0.5, 0.0, 0.0, 0.5],      # ln 2
        [0.0, 1.0, 0.0, 0.0],      # 0
    ])
    return token_choice(index, weight, logits=probs.log(), probs=probs, num_experts=4)


def test_load_cv_entropy_by_hand():
    r = hand_routing()
    assert expert_load(r).tolist() == [5, 3, 1, 1]
    # mean 2.5; squared deviations 6.25, 0.25, 2.25, 2.25 -> population variance 11/4
    assert coefficient_of_variation(expert_load(r)) == pytest.approx(math.sqrt(11 / 4) / 2.5)
    # fractions .5 .3 .1 .1
    h = -(0.5 * math.log(0.5) + 0.3 * math.log(0.3) + 2 * 0.1 * math.log(0.1))
    assert load_entropy(expert_load(r)) == pytest.approx(h / math.log(4))
    assert router_entropy(r) == pytest.approx((0 + 2 * LN2 + LN2 + LN2 + 0) / 5)
    assert dropped_tokens(r) == 0
    s = layer_stats(r, layer=7)
    assert (s.layer, s.num_experts, s.tokens, s.pairs) == (7, 4, 5, 10)
    assert s.max_over_mean == pytest.approx(5 / 2.5)
    assert s.load_fraction == pytest.approx([0.5, 0.3, 0.1, 0.1])
    assert s.dropped_fraction == 0.0


def test_extremes_of_balance():
    assert coefficient_of_variation([3, 3, 3, 3]) == 0.0
    assert load_entropy([3, 3, 3, 3]) == pytest.approx(1.0)
    assert coefficient_of_variation([8, 0, 0, 0]) == pytest.approx(math.sqrt(3))  # sqrt(E - 1)
    assert load_entropy([8, 0, 0, 0]) == 0.0
    assert math.isnan(coefficient_of_variation([0, 0]))


def test_dropped_tokens_from_mask_and_from_pairs():
    probs = torch.full((5, 2), 0.5)
    with_mask = Routing(token_index=torch.tensor([0, 2, 3]), expert_index=torch.tensor([1, 0, 1]),
                        weight=torch.ones(3), logits=probs, probs=probs, num_experts=2,
                        dropped=torch.tensor([False, True, False, False, True]))
    assert dropped_tokens(with_mask) == 2
    no_mask = Routing(token_index=torch.tensor([0, 1, 1, 3]), expert_index=torch.tensor([0, 0, 1, 1]),
                      weight=torch.ones(4), logits=probs, probs=probs, num_experts=2)
    assert dropped_tokens(no_mask) == 2  # tokens 2 and 4 have no pair
    assert layer_stats(with_mask).dropped_fraction == pytest.approx(2 / 5)


def test_switch_capacity_drops_match_the_router():
    layer = MoELayer(MoEConfig(hidden_size=16, expert_size=8, num_experts=4, top_k=1, router="switch",
                               capacity_factor=0.5, eval_capacity_factor=0.5)).eval()
    out = layer(torch.randn(40, 16))
    s = layer_stats(out.routing)
    assert s.dropped == int(out.routing.dropped.sum()) > 0
    assert s.pairs + s.dropped == s.tokens == 40


def test_sigmoid_scores_are_normalised_for_router_entropy():
    probs = torch.tensor([[0.9, 0.9], [0.2, 0.2]])  # sigmoid scores, rows do not sum to one
    r = token_choice(torch.tensor([[0], [1]]), torch.ones(2, 1), logits=probs, probs=probs, num_experts=2)
    assert router_entropy(r) == pytest.approx(LN2)


def test_token_assignments_highest_weight_first():
    r = hand_routing()
    a = token_assignments(r)
    assert a[0] == [(0, pytest.approx(0.7)), (1, pytest.approx(0.3))]
    assert [e for e, _ in a[2]] == [0, 1]  # tie 0.5 / 0.5 -> lower expert first
    assert a[3][0][0] == 3


def test_accumulating_batches_equals_one_batch():
    layer = MoELayer(MoEConfig(hidden_size=16, expert_size=8, num_experts=6, top_k=2)).eval()
    x1, x2 = torch.randn(30, 16), torch.randn(17, 16)
    acc = RoutingStats()
    acc.update((None, layer(x1).routing))
    acc.update((None, layer(x2).routing))
    one = layer_stats(layer(torch.cat([x1, x2])).routing, layer=1)
    (got,) = acc.layers()
    assert got.layer == 1 and acc.moe_layers == [1]
    assert got.load == one.load and got.tokens == one.tokens == 47
    assert got.cv == pytest.approx(one.cv)
    assert got.router_entropy == pytest.approx(one.router_entropy, rel=1e-6)
    merged = acc.merge(acc)
    assert merged.layers()[0].load == [2 * c for c in one.load]
    assert merged.layers()[0].cv == pytest.approx(one.cv)


def test_domain_expert_mutual_information_by_hand():
    assert domain_expert_mutual_information({"a": [10, 0], "b": [0, 10]}) == pytest.approx(LN2)
    assert domain_expert_mutual_information({"a": [3, 1], "b": [6, 2]}) == pytest.approx(0.0, abs=1e-12)
    # joint /8: [[.25 .25] [.5 0]], p(d) = (.5, .5), p(e) = (.75, .25)
    expected = 0.25 * math.log(0.25 / 0.375) + 0.25 * math.log(0.25 / 0.125) + 0.5 * math.log(0.5 / 0.375)
    assert domain_expert_mutual_information({"a": [2, 2], "b": [4, 0]}) == pytest.approx(expected)


def test_specialisation_per_layer():
    r = hand_routing()
    a, b = RoutingStats(), RoutingStats()
    a.update((r, None))
    b.update((r, None))
    assert specialisation({"a": a, "b": b}) == {0: pytest.approx(0.0, abs=1e-12)}


def test_expert_choice_padding_is_not_counted_as_tokens():
    """Expert choice keeps padding rows in its grid; the statistics count the real tokens only."""
    torch.manual_seed(0)
    layer = MoELayer(MoEConfig(hidden_size=8, expert_size=4, num_experts=4, router="expert_choice",
                               capacity_factor=2.0, allow_future_tokens=True)).eval()
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 8:] = False  # 24 real tokens
    with torch.no_grad():
        routing = layer(torch.randn(2, 16, 8), token_mask=mask).routing
    assert routing.num_tokens == 32 and routing.num_real_tokens == 24
    stats = RoutingStats()
    stats.update([routing])
    summary = stats.summary()
    pairs = routing.expert_index.numel()  # each expert takes ceil(real * 2 / 4) of each sequence's real tokens
    assert pairs == 4 * (8 + 4)
    assert summary["experts_per_token"] == pytest.approx(pairs / 24)
    p = routing.probs[mask.view(-1)].double()
    want = float(-(p * p.clamp_min(1e-300).log()).sum(-1).mean())
    assert router_entropy(routing) == pytest.approx(want)
    assert layer_stats(routing).router_entropy == pytest.approx(want)
    assert dropped_tokens(routing) == int(routing.dropped.sum())  # padding is not dropped
