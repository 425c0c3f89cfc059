"""Routing analysis: per-layer statistics, expert-specialisation measures, plots and an HTML token view."""

from .stats import (
    LayerStats,
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

__all__ = [
    "LayerStats",
    "RoutingStats",
    "coefficient_of_variation",
    "domain_expert_mutual_information",
    "dropped_tokens",
    "expert_load",
    "layer_stats",
    "load_entropy",
    "router_entropy",
    "specialisation",
    "token_assignments",
]
