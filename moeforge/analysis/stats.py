"""Routing statistics per MoE layer, as pure functions of :class:`~moeforge.moe.Routing` objects.

Definitions (E experts, T tokens, P (token, expert) pairs, c_e the pairs expert e received):

* load: c (E,), and load fraction f = c / P.
* balance, coefficient of variation: CV = std(c) / mean(c) with the population std (ddof 0);
  0 for a perfectly balanced layer, sqrt(E - 1) when one expert takes every pair. Shazeer et al.
  (2017) penalise CV² of importance and load; here CV is reported, not trained on.
* load entropy: H(f) / log E in [0, 1] (1 = uniform use of all experts; 0 = one expert).
* router entropy: the mean over tokens of H(p_t) in nats, p_t the router's scores for token t
  normalised to sum to one (softmax routers already do; sigmoid routers are normalised here).
  Low values mean confident routing.
* dropped tokens: tokens that reached no routed expert (Switch capacity overflow, or a token
  no expert chose under expert-choice routing); ``Routing.dropped`` when the router sets it.
* domain specialisation: the mutual information I(domain; expert) in nats between the domain a
  token comes from and the experts it is routed to, I = H(f) - sum_d p(d) H(f_d), with p(d)
  the domain's share of pairs (LLaMA-MoE and MoEfication show per-domain routing histograms;
  this is a one-number summary of them). 0 when every domain uses experts alike.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor

from ..moe.routing import Routing


def expert_load(routing: Routing) -> Tensor:
    """(E,) int64 number of (token, expert) pairs each expert received."""
    return torch.bincount(routing.expert_index.reshape(-1).cpu(), minlength=routing.num_experts)[: routing.num_experts]


def coefficient_of_variation(load: Tensor | Sequence[float]) -> float:
    """std / mean of a load vector (population std); NaN for an all-zero load."""
    x = torch.as_tensor(load, dtype=torch.float64)
    mean = x.mean()
    if mean == 0:
        return float("nan")
    return float(((x - mean) ** 2).mean().sqrt() / mean)


def _entropy(p: Tensor) -> Tensor:
    """Entropy in nats along the last dim of non-negative rows summing to one (0 log 0 = 0)."""
    return -(torch.where(p > 0, p * p.clamp_min(1e-300).log(), torch.zeros_like(p))).sum(-1)


def load_entropy(load: Tensor | Sequence[float]) -> float:
    """Entropy of the load fractions divided by log E, in [0, 1]; 1.0 when E = 1; NaN if empty."""
    x = torch.as_tensor(load, dtype=torch.float64)
    total = x.sum()
    if total == 0:
        return float("nan")
    if x.numel() == 1:
        return 1.0
    return float(_entropy(x / total) / math.log(x.numel()))


def router_entropy_sum(routing: Routing) -> float:
    """Sum over tokens (padding left out) of the entropy (nats) of each token's normalised router scores."""
    p = routing.probs.detach().double().cpu()
    if routing.valid is not None:
        p = p[routing.valid.cpu()]
    p = p / p.sum(-1, keepdim=True).clamp_min(1e-300)
    return float(_entropy(p).sum())


def router_entropy(routing: Routing) -> float:
    """Mean over tokens of the entropy (nats) of each token's normalised router scores."""
    return router_entropy_sum(routing) / max(1, routing.num_real_tokens)


def dropped_tokens(routing: Routing) -> int:
    """Tokens that reached no routed expert: ``routing.dropped`` when set, else derived from the pairs."""
    if routing.dropped is not None:
        return int(routing.dropped.sum())
    reached = torch.zeros(routing.num_tokens, dtype=torch.bool)
    reached[routing.token_index.cpu()] = True
    return int((~reached).sum())


def token_assignments(routing: Routing) -> list[list[tuple[int, float]]]:
    """For every token, its (expert, weight) pairs, highest weight first (empty if dropped)."""
    out: list[list[tuple[int, float]]] = [[] for _ in range(routing.num_tokens)]
    tok = routing.token_index.cpu().tolist()
    exp = routing.expert_index.cpu().tolist()
    wt = routing.weight.detach().float().cpu().tolist()
    for t, e, w in zip(tok, exp, wt):
        out[t].append((e, w))
    for pairs in out:
        pairs.sort(key=lambda p: (-p[1], p[0]))
    return out


def domain_expert_mutual_information(loads: Mapping[str, Tensor | Sequence[float]]) -> float:
    """I(domain; expert) in nats from each domain's (E,) load counts (see the module docstring)."""
    mats = [torch.as_tensor(v, dtype=torch.float64) for v in loads.values()]
    if not mats:
        return float("nan")
    joint = torch.stack(mats)  # (D, E) counts
    total = joint.sum()
    if total == 0:
        return float("nan")
    joint = joint / total
    p_domain = joint.sum(1, keepdim=True)
    p_expert = joint.sum(0, keepdim=True)
    mask = joint > 0
    ratio = joint[mask] / (p_domain.expand_as(joint)[mask] * p_expert.expand_as(joint)[mask])
    return float((joint[mask] * ratio.log()).sum())


@dataclass
class LayerStats:
    """Routing statistics of one MoE layer over some tokens (see the module docstring).

    ``load`` holds pair counts per expert; ``max_over_mean`` is the busiest expert's load over
    the mean load (1 = balanced; the capacity an expert would need).
    """

    layer: int
    num_experts: int
    tokens: int
    pairs: int
    load: list[int]
    cv: float
    load_entropy: float
    max_over_mean: float
    router_entropy: float
    dropped: int
    dropped_fraction: float

    @property
    def load_fraction(self) -> list[float]:
        return [c / self.pairs if self.pairs else float("nan") for c in self.load]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["load_fraction"] = self.load_fraction
        return d


def _make_stats(layer: int, load: Tensor, tokens: int, entropy_sum: float, dropped: int) -> LayerStats:
    load = load.to(torch.int64)
    pairs = int(load.sum())
    mean = pairs / load.numel() if load.numel() else 0.0
    return LayerStats(
        layer=layer,
        num_experts=int(load.numel()),
        tokens=tokens,
        pairs=pairs,
        load=load.tolist(),
        cv=coefficient_of_variation(load),
        load_entropy=load_entropy(load),
        max_over_mean=float(load.max()) / mean if mean else float("nan"),
        router_entropy=entropy_sum / tokens if tokens else float("nan"),
        dropped=dropped,
        dropped_fraction=dropped / tokens if tokens else float("nan"),
    )


def layer_stats(routing: Routing, layer: int = 0) -> LayerStats:
    """:class:`LayerStats` of one layer's routing of one batch."""
    return _make_stats(layer, expert_load(routing), routing.num_real_tokens, router_entropy_sum(routing),
                       dropped_tokens(routing))


@dataclass
class _Accum:
    load: Tensor
    tokens: int = 0
    entropy_sum: float = 0.0
    dropped: int = 0


@dataclass
class RoutingStats:
    """Routing statistics accumulated over many batches, per layer.

    ``update(routing)`` takes a model output's ``routing`` tuple (one entry per decoder layer,
    None for dense layers). Counts add up exactly, so the statistics of several batches equal
    those of one batch holding all their tokens.
    """

    _layers: dict[int, _Accum] = field(default_factory=dict)

    def update(self, routing: Sequence[Routing | None]) -> None:
        for index, r in enumerate(routing):
            if r is None:
                continue
            acc = self._layers.setdefault(index, _Accum(torch.zeros(r.num_experts, dtype=torch.int64)))
            if acc.load.numel() != r.num_experts:
                raise ValueError(f"layer {index}: {r.num_experts} experts, earlier batches had {acc.load.numel()}")
            acc.load += expert_load(r)
            acc.tokens += r.num_real_tokens
            acc.entropy_sum += router_entropy_sum(r)
            acc.dropped += dropped_tokens(r)

    def merge(self, other: RoutingStats) -> RoutingStats:
        """A new accumulator holding both ``self``'s and ``other``'s tokens."""
        out = RoutingStats()
        for src in (self, other):
            for index, acc in src._layers.items():
                dst = out._layers.setdefault(index, _Accum(torch.zeros_like(acc.load)))
                dst.load += acc.load
                dst.tokens += acc.tokens
                dst.entropy_sum += acc.entropy_sum
                dst.dropped += acc.dropped
        return out

    @property
    def moe_layers(self) -> list[int]:
        return sorted(self._layers)

    def __bool__(self) -> bool:
        return bool(self._layers)

    def layers(self) -> list[LayerStats]:
        """One :class:`LayerStats` per MoE layer, in depth order."""
        return [
            _make_stats(i, acc.load, acc.tokens, acc.entropy_sum, acc.dropped)
            for i, acc in sorted(self._layers.items())
        ]

    def load(self, layer: int) -> Tensor:
        """(E,) accumulated pair counts of decoder layer ``layer``."""
        return self._layers[layer].load.clone()

    def load_fractions(self) -> Tensor:
        """(L_moe, E) load fractions, rows in :attr:`moe_layers` order (experts counts must agree)."""
        rows = [acc.load.double() / acc.load.sum().clamp_min(1) for _, acc in sorted(self._layers.items())]
        if len({r.numel() for r in rows}) > 1:
            raise ValueError("layers have different expert counts; use load() per layer")
        return torch.stack(rows) if rows else torch.zeros(0, 0, dtype=torch.float64)

    def summary(self) -> dict:
        """Means over layers of CV, load entropy, router entropy; routed experts per token (pairs over
        tokens: k for dropless top-k, less with dropping, variable under expert choice); total dropped fraction."""
        stats = self.layers()
        if not stats:
            return {}
        tokens = sum(s.tokens for s in stats)
        return {
            "layers": len(stats),
            "experts_per_token": sum(s.pairs for s in stats) / tokens if tokens else float("nan"),
            "mean_cv": sum(s.cv for s in stats) / len(stats),
            "mean_load_entropy": sum(s.load_entropy for s in stats) / len(stats),
            "mean_router_entropy": sum(s.router_entropy for s in stats) / len(stats),
            "dropped_fraction": sum(s.dropped for s in stats) / tokens if tokens else float("nan"),
        }


def specialisation(per_domain: Mapping[str, RoutingStats]) -> dict[int, float]:
    """Per MoE layer, I(domain; expert) in nats over the domains' accumulated loads."""
    layers = sorted(set().union(*(s.moe_layers for s in per_domain.values()))) if per_domain else []
    return {
        layer: domain_expert_mutual_information({d: s.load(layer) for d, s in per_domain.items() if layer in s.moe_layers})
        for layer in layers
    }
