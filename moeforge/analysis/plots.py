"""PNG plots of routing (matplotlib, Agg backend; nothing is shown on screen).

* :func:`plot_load_heatmap`: MoE layers x experts, each cell the expert's load relative to a
  uniform load (1 = balanced), with each layer's CV beside its row.
* :func:`plot_domain_usage`: for a few layers, domains x experts, each cell the share of that
  domain's routed pairs an expert received relative to uniform; the specialisation view of
  LLaMA-MoE (Fig. 5) and MoEfication, with I(domain; expert) per layer in the titles.
* :func:`plot_curves`: lines (e.g. perplexity against training tokens), for experiment reports.

Every function writes the file atomically (temporary file, then rename) and returns its path.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from ..utils.io import temp_file  # noqa: E402
from .stats import RoutingStats, domain_expert_mutual_information  # noqa: E402


def save_figure(fig, path: str | os.PathLike, *, dpi: int = 110) -> Path:
    """Write ``fig`` as a PNG at ``path`` through a temporary file beside it and a rename, so a
    failed write leaves the previous plot (and no temporary file); the figure is closed either way."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        tmp = temp_file(path.parent, prefix=f".{path.name}.", suffix=".png")
        try:
            fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
    except OSError as err:  # name the plot, not the temporary file beside it
        raise OSError(err.errno, f"cannot write {path}: {err.strerror or err}") from None
    finally:
        plt.close(fig)
    return path


def _relative_norm(vmax: float) -> TwoSlopeNorm:
    return TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=max(2.0, vmax))


def plot_load_heatmap(stats: RoutingStats, path: str | os.PathLike, *, title: str = "Expert load per layer") -> Path:
    """Heatmap of (MoE layers, experts): load / uniform load; row labels are decoder layer indices."""
    if not stats:
        raise ValueError("no MoE layer was routed; the model has no MoE layers or nothing was evaluated")
    layers = stats.layers()
    experts = max(s.num_experts for s in layers)
    rel = [[c * s.num_experts / s.pairs if s.pairs else 0.0 for c in s.load] + [float("nan")] * (experts - s.num_experts)
           for s in layers]
    vmax = max(max(v for v in row if v == v) for row in rel)
    height = 1.8 + 0.26 * len(layers)
    width = 3.4 + 0.42 * experts
    fig, ax = plt.subplots(figsize=(width, height))
    im = ax.imshow(rel, aspect="auto", cmap="RdBu_r", norm=_relative_norm(vmax), interpolation="nearest")
    ax.set_xticks(range(experts))
    ax.set_xticklabels([str(e) for e in range(experts)], fontsize=8)
    ax.set_yticks(range(len(layers)))
    ax.set_yticklabels([f"{s.layer}  (CV {s.cv:.2f})" for s in layers], fontsize=7)
    ax.set_xlabel("expert")
    ax.set_ylabel("layer (coefficient of variation of its load)")
    ax.set_title(f"{title}\n({layers[0].tokens:,} tokens per layer)", fontsize=10)
    cbar = fig.colorbar(im, ax=ax, pad=0.03, fraction=0.08)
    cbar.set_label("load / uniform load", fontsize=8)
    return save_figure(fig, path)


def choose_layers(layers: Sequence[int], count: int = 6) -> list[int]:
    """Up to ``count`` layers spread evenly over ``layers``, first and last included."""
    layers = list(layers)
    if len(layers) <= count:
        return layers
    picks = sorted({layers[round(i * (len(layers) - 1) / (count - 1))] for i in range(count)})
    return picks


def plot_domain_usage(
    per_domain: Mapping[str, RoutingStats],
    path: str | os.PathLike,
    *,
    layers: Sequence[int] | None = None,
    title: str = "Expert usage per domain",
) -> Path:
    """Per chosen layer, a (domains, experts) heatmap of each domain's load relative to uniform."""
    domains = [d for d, s in per_domain.items() if s]
    if not domains:
        raise ValueError("no domain has routing statistics; evaluate a MoE model on at least one corpus")
    all_layers = sorted(set().union(*(per_domain[d].moe_layers for d in domains)))
    layers = choose_layers(all_layers) if layers is None else list(layers)
    cols = min(3, len(layers))
    rows = (len(layers) + cols - 1) // cols
    experts = max(per_domain[domains[0]].load(layers[0]).numel(), 1)
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 + cols * (1.4 + 0.32 * experts), 0.8 + rows * (0.9 + 0.32 * len(domains))),
                             squeeze=False)
    panels = []
    for layer in layers:
        loads = {d: per_domain[d].load(layer).double() for d in domains if layer in per_domain[d].moe_layers}
        matrix = [(v * v.numel() / v.sum()).tolist() if v.sum() > 0 else [0.0] * v.numel() for v in loads.values()]
        panels.append((layer, loads, matrix))
    # one colour scale for every panel, so equal colours mean equal loads and the one colour bar is right
    norm = _relative_norm(max(max(max(r) for r in matrix) for _, _, matrix in panels))
    ims = []
    for k, (layer, loads, matrix) in enumerate(panels):
        ax = axes[k // cols][k % cols]
        ims.append(ax.imshow(matrix, aspect="auto", cmap="RdBu_r", norm=norm, interpolation="nearest"))
        mi = domain_expert_mutual_information(loads)
        ax.set_title(f"layer {layer}  (I = {mi:.3f} nats)", fontsize=9)
        ax.set_yticks(range(len(loads)))
        ax.set_yticklabels(list(loads), fontsize=8)
        n_exp = len(matrix[0])
        step = 1 if n_exp <= 16 else 2
        ax.set_xticks(range(0, n_exp, step))
        ax.set_xticklabels([str(e) for e in range(0, n_exp, step)], fontsize=7)
        ax.set_xlabel("expert", fontsize=8)
    for k in range(len(layers), rows * cols):
        axes[k // cols][k % cols].axis("off")
    fig.suptitle(f"{title}: share of each domain's routed tokens per expert, relative to uniform", fontsize=10)
    fig.tight_layout()
    cbar = fig.colorbar(ims[-1], ax=axes.ravel().tolist(), fraction=0.03, pad=0.02)
    cbar.set_label("load / uniform load", fontsize=8)
    return save_figure(fig, path)


def plot_curves(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
    logy: bool = False,
    hlines: Mapping[str, float] | None = None,
) -> Path:
    """Line plot of ``{label: (xs, ys)}``, with optional labelled horizontal reference lines."""
    if not series:
        raise ValueError("plot_curves needs at least one series")
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for label, (xs, ys) in series.items():
        ax.plot(list(xs), list(ys), marker="o", markersize=3, label=label)
    for k, (label, y) in enumerate((hlines or {}).items()):
        ax.axhline(y, color="k", linestyle=("--", ":", "-.")[k % 3], linewidth=1, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path)


__all__ = ["plot_load_heatmap", "plot_domain_usage", "plot_curves", "choose_layers"]
