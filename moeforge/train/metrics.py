"""``OUTPUT_DIR/metrics.jsonl`` and the PNG plots drawn from it.

One JSON object per line. Training records (``"kind": "train"``) hold at least ``step`` and
``loss`` (the mean next-token loss over the steps since the previous record, weighted by
target tokens) plus ``aux_loss``, ``aux_losses``, ``lr``, ``grad_norm``, ``tokens``,
``tokens_per_s``, ``domain_loss`` (per-domain training loss), ``weights`` (the mixture weights
after this step's dynamic update, i.e. those the next step samples with) and ``expert_load`` (per
MoE layer, the fraction of routed (token, expert) pairs each expert got). Evaluation records
(``"kind": "eval"``) hold ``step``, ``loss`` (mean over domains weighted by the tokens evaluated),
``eval`` (per-domain validation loss) and ``eval_tokens`` (the budget per domain: ``eval_tokens``, or
a dynamic mixture's own ``mixture.eval_tokens`` for its updates); the end-of-run evaluation carries ``"final": true``
(a dynamic mixture's update may have evaluated the same step on its own, smaller budget; a run
extended by rerunning it with more ``steps`` keeps the earlier end's record, so the last ``final``
record is the current end's).
Task records (``"kind": "tasks"``, with ``eval_tasks``) hold ``step`` and ``tasks`` (per task:
``accuracy``, ``correct``, ``total``, and ``accuracy_norm`` for multiple choice); the end-of-run one
carries ``"final": true``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..utils.io import atomic_write_text

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:
    """Append-only JSONL writer (main process only)."""

    def __init__(self, output_dir: str | Path, enabled: bool = True) -> None:
        self.path = Path(output_dir) / METRICS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop records past ``step`` (resuming from a checkpoint at ``step`` rewrites them identically)."""
        if not self.enabled or not self.path.is_file():
            return
        keep = [r for r in read_metrics(self.path) if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in keep))

    def reset(self) -> None:
        if self.enabled and self.path.exists():
            self.path.unlink()

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics.jsonl (a torn last line from a crash is skipped)."""
    out = []
    p = Path(path)
    if p.is_dir():
        p = p / METRICS_FILE
    if not p.is_file():
        return out
    for line in p.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def eval_groups(evals: list[dict[str, Any]]) -> dict[int, list[dict[str, Any]]]:
    """Evaluation records grouped by their per-domain token budget, largest first: a dynamic
    mixture's updates evaluate on their own (usually smaller) budget, and losses measured on
    different validation subsets do not belong on one line. Records without ``eval_tokens``
    (written before it was recorded) form one group under 0."""
    budgets = sorted({r.get("eval_tokens") or 0 for r in evals}, reverse=True)
    return {b: [r for r in evals if (r.get("eval_tokens") or 0) == b] for b in budgets}


def write_plots(output_dir: str | Path, records: list[dict[str, Any]] | None = None) -> list[Path]:
    """loss.png, domain_loss.png, domain_weights.png and expert_load.png from the metrics; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..analysis.plots import save_figure

    out_dir = Path(output_dir)
    records = read_metrics(out_dir) if records is None else records
    train = [r for r in records if r.get("kind", "train") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    written: list[Path] = []
    if not train:
        return written

    def save(fig, name: str) -> None:
        fig.tight_layout()
        written.append(save_figure(fig, out_dir / name))

    by_budget = eval_groups(evals)
    budgets = list(by_budget)

    # loss
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train (next-token)")
    for b, group in by_budget.items():
        label = "validation" + (f" ({b:,} tokens per domain)" if len(budgets) > 1 else "")
        ax.plot([r["step"] for r in group], [r["loss"] for r in group], "o-", label=label)
    if any(r.get("aux_loss") for r in train):
        ax2 = ax.twinx()
        ax2.plot([r["step"] for r in train], [r.get("aux_loss") or 0.0 for r in train], color="tab:red", alpha=0.5, label="aux")
        ax2.set_ylabel("aux loss", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    ax.set_title("Loss")
    save(fig, "loss.png")

    # per-domain loss (validation on the largest budget when available, else training)
    fig, ax = plt.subplots(figsize=(7, 4))
    source = by_budget[budgets[0]] if evals else train
    key = "eval" if evals else "domain_loss"
    names = sorted({n for r in source for n in (r.get(key) or {})})
    for n in names:
        pts = [(r["step"], r[key][n]) for r in source if n in (r.get(key) or {})]
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-" if evals else "-", label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss" if evals else "training loss")
    ax.set_title("Per-domain loss")
    if names:
        ax.legend()
    save(fig, "domain_loss.png")

    # domain weights
    fig, ax = plt.subplots(figsize=(7, 4))
    names = list((train[-1].get("weights") or {}).keys())
    for n in names:
        ax.plot([r["step"] for r in train], [(r.get("weights") or {}).get(n, float("nan")) for r in train], label=n)
    ax.set_xlabel("step")
    ax.set_ylabel("sampling weight")
    ax.set_ylim(0, 1)
    ax.set_title("Domain weights")
    if names:
        ax.legend()
    save(fig, "domain_weights.png")

    # expert load
    loads = [r for r in train if r.get("expert_load")]
    if loads:
        import numpy as np

        last = loads[-1]["expert_load"]
        layers = sorted(last, key=int)
        grid = np.array([last[k] for k in layers])
        fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, max(3.5, 0.25 * len(layers) + 1.5)))
        im = a1.imshow(grid, aspect="auto", cmap="viridis")
        a1.set_yticks(range(len(layers)), [f"layer {k}" for k in layers])
        a1.set_xlabel("expert")
        a1.set_title(f"Expert load at step {loads[-1]['step']} (fraction of routed pairs)")
        fig.colorbar(im, ax=a1)
        for k in layers:
            series = [(r["step"], max(r["expert_load"][k]) * len(r["expert_load"][k])) for r in loads if k in r["expert_load"]]
            a2.plot([s for s, _ in series], [v for _, v in series], label=f"layer {k}")
        a2.axhline(1.0, color="gray", linestyle="--", linewidth=0.8)
        a2.set_xlabel("step")
        a2.set_ylabel("max load / uniform load")
        a2.set_title("Load imbalance per layer")
        if len(layers) <= 12:
            a2.legend(fontsize=7)
        save(fig, "expert_load.png")
    return written
