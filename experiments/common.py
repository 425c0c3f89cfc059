"""Shared pieces of the claim experiments: the two testbeds, their evaluation, short CPT runs, tables.

Not a library module: only the scripts in ``experiments/`` import it. Everything it does goes
through moeforge's public APIs (``moeforge.load``, ``moeforge.convert``, ``moeforge.train``,
``moeforge.eval``).
"""

from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from moeforge.eval.corpora import data_root, resolve_corpus, tokenize_corpus  # noqa: E402
from moeforge.eval.perplexity import evaluate_nll  # noqa: E402


@dataclass(frozen=True)
class Testbed:
    """A dense model that the claims are run on, and how it is measured and trained.

    ``primary`` is the headline metric: perplexity on one corpus, or "mean", the geometric mean of
    the corpora's perplexities, exp(mean over corpora of the mean NLL).
    """

    name: str
    model: str
    corpora: tuple[str, ...]
    primary: str
    eval_tokens: int
    eval_seq_len: int
    cpt_data: tuple[dict, ...]
    cpt_seq_len: int
    cpt_batch: int
    cpt_lr: float
    calibration_tokens: int
    description: str

    @property
    def title(self) -> str:
        """How report headings name this testbed."""
        return "smollm2" if self.name == "smollm2" else "the testbed"

    @property
    def primary_label(self) -> str:
        if self.primary == "mean":
            return f"held-out ppl (geo. mean of {', '.join(self.corpora)})"
        return f"{self.primary} ppl"


def _wiki_valid() -> str:
    return str(data_root() / "wikitext-2" / "valid.txt")


TESTBEDS = {
    "smollm2": Testbed(
        name="smollm2",
        model="smollm2",
        corpora=("wikitext2",),
        primary="wikitext2",
        eval_tokens=2048,
        eval_seq_len=512,
        cpt_data=(
            {"name": "wiki", "path": "WIKI_VALID", "weight": 0.4},
            {"name": "prose", "builtin": "prose", "weight": 0.2},
            {"name": "code", "builtin": "code", "weight": 0.25},
            {"name": "arithmetic", "builtin": "arithmetic", "weight": 0.15},
        ),
        cpt_seq_len=256,
        cpt_batch=4,
        cpt_lr=2e-4,
        calibration_tokens=2048,
        description="SmolLM2-135M-Instruct; WikiText-2 test perplexity on the first 2,048 tokens (4 windows of 512)",
    ),
    "testbed": Testbed(
        name="testbed",
        model=str(REPO / "runs" / "testbed" / "dense"),
        corpora=("prose", "code", "arithmetic"),
        primary="mean",
        eval_tokens=2048,
        eval_seq_len=256,
        cpt_data=(
            {"name": "prose", "builtin": "prose", "weight": 0.30},
            {"name": "code", "builtin": "code", "weight": 0.45},
            {"name": "arithmetic", "builtin": "arithmetic", "weight": 0.25},
        ),
        cpt_seq_len=256,
        cpt_batch=4,
        cpt_lr=1e-3,
        calibration_tokens=2048,
        description="the 10M dense LLaMA of experiments/testbed.py; held-out built-in domains (valid split), first 2,048 tokens of each (256-token windows)",
    ),
}


def get_testbed(name: str) -> Testbed:
    if name not in TESTBEDS:
        raise SystemExit(f"unknown testbed {name!r}; choose {', '.join(TESTBEDS)}")
    tb = TESTBEDS[name]
    if name == "testbed" and not (Path(tb.model) / "config.json").is_file():
        raise SystemExit(f"{tb.model} is missing; run experiments/testbed.py first")
    return tb


def cpt_sources(tb: Testbed) -> list[dict]:
    out = []
    for src in tb.cpt_data:
        s = dict(src)
        if s.get("path") == "WIKI_VALID":
            s["path"] = _wiki_valid()
        out.append(s)
    return out


class Evaluator:
    """Fixed, pre-tokenised evaluation sets of a testbed; ``__call__(model)`` -> {corpus: ppl, "primary": ppl}."""

    def __init__(self, tb: Testbed, tokenizer) -> None:
        self.tb = tb
        self.ids = {c: tokenize_corpus(tokenizer, resolve_corpus(c), tb.eval_tokens) for c in tb.corpora}

    def __call__(self, model) -> dict[str, float]:
        nll = {}
        for c, ids in self.ids.items():
            res = evaluate_nll(model, ids, seq_len=self.tb.eval_seq_len, batch_size=4)
            nll[c] = res.mean_nll
        out = {c: math.exp(v) for c, v in nll.items()}
        out["primary"] = math.exp(sum(nll.values()) / len(nll)) if self.tb.primary == "mean" else out[self.tb.primary]
        return out


def set_threads() -> None:
    """One intra-op thread unless OMP_NUM_THREADS says otherwise (the machine is shared)."""
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))


class ResultStore:
    """A JSON file of finished runs keyed by name, so an interrupted experiment resumes where it stopped."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def __contains__(self, key: str) -> bool:
        return key in self.data

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    def put(self, key: str, value: Any) -> None:
        from moeforge.utils.io import atomic_write_json

        self.data[key] = value
        atomic_write_json(self.path, self.data)


@dataclass
class Curve:
    """Perplexity measured during a CPT run: (tokens seen, {corpus: ppl}) pairs."""

    points: list[tuple[int, dict[str, float]]] = field(default_factory=list)


class EvalAt:
    """Trainer callback: evaluate the model with ``evaluator`` after the listed steps."""

    def __init__(self, evaluator: Evaluator, steps: set[int], tokens_per_step: int, curve: Curve) -> None:
        self.evaluator, self.steps, self.tps, self.curve = evaluator, steps, tokens_per_step, curve

    def on_step_end(self, trainer, step, stats) -> None:
        if step in self.steps:
            self.curve.points.append((step * self.tps, self.evaluator(trainer.model)))
            trainer.model.train()


def run_cpt(
    model,
    tokenizer,
    tb: Testbed,
    out_dir: Path,
    *,
    steps: int,
    evaluator: Evaluator | None = None,
    eval_steps: set[int] | None = None,
    mixture: dict | None = None,
    distill: dict | None = None,
    lr: float | None = None,
    seed: int = 0,
    extra: dict | None = None,
):
    """Train ``model`` in memory with ``moeforge.train`` on the testbed's CPT mixture; returns (result, curve, seconds)."""
    from moeforge.train import train

    cfg = {
        "model": tb.model,
        "output_dir": str(out_dir),
        "data": cpt_sources(tb),
        "mixture": mixture or {"type": "static"},
        "steps": steps,
        "batch_size": tb.cpt_batch,
        "seq_len": tb.cpt_seq_len,
        "lr": lr or tb.cpt_lr,
        "warmup_steps": max(1, steps // 10),
        "save_every": 10**9,
        "keep_last": 1,
        "log_every": max(1, steps // 10),
        "seed": seed,
        "overwrite": True,
        "progress": False,
        "plots": False,
        "save_final": False,
        "precision": "fp32",
    }
    if distill:
        cfg["distill"] = distill
    cfg.update(extra or {})
    curve = Curve()
    callbacks = []
    if evaluator is not None and eval_steps:
        callbacks.append(EvalAt(evaluator, set(eval_steps), tb.cpt_batch * tb.cpt_seq_len, curve))
    t0 = time.perf_counter()
    result = train(cfg, model=model, tokenizer=tokenizer, callbacks=callbacks)
    return result, curve, time.perf_counter() - t0


def today() -> str:
    return datetime.date.today().isoformat()


def fmt(x: float | None, spec: str = ".2f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    if x >= 1e4:
        return f"{x:.3g}"
    return format(x, spec)


def table(header: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def command_line() -> str:
    args = " ".join(sys.argv[1:])
    return f"OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/{Path(sys.argv[0]).name} {args}".strip()


def measure_lm(path: str, corpora: list[str], tokens: int, choice) -> dict:
    """Held-out perplexity of the model at ``path`` on ``corpora`` (``tokens`` each, 512-token
    windows), its active parameters, and its accuracy on the multiple-choice task ``choice`` (3 shots)."""
    import moeforge
    from moeforge.eval.evaluate import evaluate
    from moeforge.eval.tasks import evaluate_task

    model, tok = moeforge.load_with_tokenizer(path)
    report = evaluate(model, tok, corpora, max_tokens=tokens, seq_len=512)
    acc = evaluate_task(model, tok, choice, shots=3, batch_size=16)
    return {"perplexity": report.perplexity, "active_parameters": report.parameters["active"],
            "arithmetic_choice": acc.accuracy, "arithmetic_choice_interval": list(acc.interval)}


def perplexity_choice_table(rows: dict, corpora: list[str], label=str, number=lambda v: f"{v:.2f}") -> list[str]:
    """Markdown table lines of :func:`measure_lm` rows: active parameters, perplexity per corpus,
    arithmetic-choice accuracy with its 95% interval."""
    lines = ["| model | active params | " + " | ".join(corpora) + " | arithmetic-choice |",
             "|---|---:|" + "---:|" * len(corpora) + "---:|"]
    for name, row in rows.items():
        lo, hi = row["arithmetic_choice_interval"]
        lines.append(f"| {label(name)} | {row['active_parameters'] / 1e6:.1f}M | "
                     + " | ".join(number(row["perplexity"][c]) for c in corpora)
                     + f" | {row['arithmetic_choice']:.1%} [{lo:.0%}-{hi:.0%}] |")
    return lines


def hot_share(record: dict) -> float | None:
    """Mean over MoE layers of the busiest routed expert's share of the (token, expert) pairs in a
    metrics.jsonl training record (0.5 at top-2: every token picks that expert); None without loads."""
    loads = record.get("expert_load") or {}
    return sum(max(v) for v in loads.values()) / len(loads) if loads else None
