"""Expert usage per task or domain: the paper's specialisation analysis (Zadouri et al. 2023, sec. 4.4, fig. 6).

:func:`expert_usage` runs an adapted model over a few batches of each domain while recording its
routers (:meth:`AdaptedModel.record_routing`) and returns the average router weight of each
expert, per module and domain. :func:`plot_expert_usage` draws one heat map (domains x experts)
per chosen module into a PNG; :func:`specialisation` condenses the table into one number, the
mean Jensen-Shannon divergence between domains' expert distributions (0: identical usage).
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor

from ..errors import MoeforgeError

#: domain -> module name -> (E,) mean router weight
Usage = dict[str, dict[str, Tensor]]


@torch.no_grad()
def expert_usage(model, batches: Mapping[str, Iterable]) -> Usage:
    """Average router weight per expert, per adapted module, for each domain's batches.

    ``batches`` maps a domain name to an iterable of model inputs: a (B, L) LongTensor of token
    ids or a dict of keyword arguments (``input_ids``, ``attention_mask``...). Padding positions
    are left out when an ``attention_mask`` is given.
    """
    if not model.peft_config.has_router:
        raise MoeforgeError(f"{type(model.peft_config).__name__} has no router, so there is no expert usage to measure.")
    was_training = model.training
    model.eval()
    usage: Usage = {}
    try:
        for domain, items in batches.items():
            with model.record_routing() as recorder:
                for item in items:
                    if isinstance(item, Tensor):
                        model(input_ids=item)
                    else:
                        model(**item)
            if not recorder.usage:
                raise MoeforgeError(f"domain {domain!r} produced no routing decisions; give it at least one non-empty batch.")
            usage[domain] = recorder.mean_probs()
    finally:
        model.train(was_training)
    return usage


def _js_divergence(p: Tensor, q: Tensor) -> float:
    p, q = p.double().clamp_min(1e-12), q.double().clamp_min(1e-12)
    p, q = p / p.sum(), q / q.sum()
    m = 0.5 * (p + q)
    return float(0.5 * (p * (p / m).log2()).sum() + 0.5 * (q * (q / m).log2()).sum())


def specialisation(usage: Usage) -> float:
    """Mean over modules of the mean pairwise Jensen-Shannon divergence (bits, in [0, 1]) between
    domains' expert distributions; 0 when every domain uses the experts alike."""
    domains = list(usage)
    if len(domains) < 2:
        raise MoeforgeError("specialisation needs the usage of at least two domains.")
    modules = list(usage[domains[0]])
    values = [
        _js_divergence(usage[a][m], usage[b][m]) for m in modules for a, b in itertools.combinations(domains, 2)
    ]
    return sum(values) / len(values)


def pick_modules(names: list[str], count: int = 6) -> list[str]:
    """Up to ``count`` module names spread over kinds (k_proj, down_proj, ...) and depth.

    Each chosen kind contributes its shallowest and deepest module (more depths when there are
    few kinds); with more kinds than fit, kinds are taken evenly from the model's order.
    """
    kinds: dict[str, list[str]] = {}
    for name in names:
        kinds.setdefault(name.rsplit(".", 1)[-1], []).append(name)
    groups = list(kinds.values())
    if not groups:
        return []
    depths = max(2, count // len(groups))
    n_kinds = max(1, min(len(groups), count // depths))
    picked_groups = [groups[round(i * (len(groups) - 1) / max(n_kinds - 1, 1))] for i in range(n_kinds)]
    chosen: list[str] = []
    for group in picked_groups:
        idx = sorted({round(i * (len(group) - 1) / max(depths - 1, 1)) for i in range(depths)})
        chosen.extend(group[i] for i in idx)
    return chosen[:count]


def plot_expert_usage(usage: Usage, path: str | os.PathLike, *, modules: list[str] | None = None,
                      title: str | None = None) -> Path:
    """Write a PNG with one domains x experts heat map of mean router weight per module."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.plots import save_figure

    domains = list(usage)
    if not domains:
        raise MoeforgeError("no expert usage to plot: measure it with expert_usage() first.")
    all_modules = list(usage[domains[0]])
    modules = modules or pick_modules(all_modules)
    unknown = [m for m in modules if m not in usage[domains[0]]]
    if unknown:
        raise MoeforgeError(f"no usage recorded for {', '.join(unknown)}; recorded modules include {', '.join(all_modules[:5])}.")
    cols = min(3, len(modules))
    rows = (len(modules) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 0.5 * len(domains) * rows + 1.6 * rows), squeeze=False)
    for ax in axes.flat[len(modules):]:
        ax.axis("off")
    for ax, module in zip(axes.flat, modules):
        table = torch.stack([usage[d][module] for d in domains]).numpy()
        im = ax.imshow(table, aspect="auto", cmap="viridis", vmin=0.0)
        ax.set_title(module.removeprefix("model.").replace("layers.", "L"), fontsize=8)
        ax.set_yticks(range(len(domains)), domains, fontsize=8)
        ax.set_xticks(range(table.shape[1]), [str(i) for i in range(table.shape[1])], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.suptitle(title or "mean router weight per expert, by domain", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)
