"""One evaluation of a model: perplexity per corpus, speed, cost, and routing statistics.

:func:`evaluate` is what ``moeforge eval`` runs; :func:`write_analysis` writes its plots and the
token-level HTML view. Neither prints: progress goes to an optional callback.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..analysis.stats import RoutingStats, specialisation
from ..errors import MoeforgeError
from ..utils.positions import model_context
from .corpora import EvalCorpus, default_corpora, resolve_corpus, tokenize_corpus
from .cost import flops_per_token, parameter_counts
from .perplexity import NLLResult, evaluate_nll


@dataclass
class CorpusResult:
    """Perplexity of one corpus; ``tokens_per_second`` is forward-pass throughput."""

    name: str
    source: str
    perplexity: float
    tokens: int
    predictions: int
    seconds: float

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    def to_dict(self) -> dict:
        return {"source": self.source, "perplexity": self.perplexity, "tokens": self.tokens,
                "predictions": self.predictions, "seconds": self.seconds, "tokens_per_second": self.tokens_per_second}


@dataclass
class EvalReport:
    """Everything :func:`evaluate` measured.

    ``routing`` holds statistics over all corpora together; ``routing_per_corpus`` one
    accumulator per corpus (both empty for dense models).
    """

    model: str
    corpora: dict[str, CorpusResult]
    parameters: dict[str, int]
    flops_per_token: int
    seq_len: int
    """The longest window actually scored (``seq_len`` unless every corpus is shorter); FLOPs use it."""
    routing: RoutingStats = field(default_factory=RoutingStats)
    routing_per_corpus: dict[str, RoutingStats] = field(default_factory=dict)
    snippets: dict[str, str] = field(default_factory=dict)
    """The start of each corpus's text (for the HTML token view)."""
    notes: list[str] = field(default_factory=list)
    """Caveats about what the numbers mean for this model (e.g. expert-choice routing)."""

    @property
    def perplexity(self) -> dict[str, float]:
        return {name: r.perplexity for name, r in self.corpora.items()}

    @property
    def tokens_per_second(self) -> float:
        tokens = sum(r.tokens for r in self.corpora.values())
        seconds = sum(r.seconds for r in self.corpora.values())
        return tokens / seconds if seconds > 0 else float("inf")

    @property
    def is_moe(self) -> bool:
        return bool(self.routing)

    def to_dict(self) -> dict:
        out = {
            "model": self.model,
            "perplexity": self.perplexity,
            "corpora": {n: r.to_dict() for n, r in self.corpora.items()},
            "parameters": dict(self.parameters),
            "flops_per_token": self.flops_per_token,
            "seq_len": self.seq_len,
            "tokens_per_second": self.tokens_per_second,
            "notes": list(self.notes),
            "routing": None,
        }
        if self.is_moe:
            out["routing"] = {
                "summary": self.routing.summary(),
                "layers": [s.to_dict() for s in self.routing.layers()],
                "specialisation_nats": {str(k): v for k, v in specialisation(self.routing_per_corpus).items()},
            }
        return _json_safe(out)


def _json_safe(value):
    """NaN/inf -> None so the report is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def evaluate(
    model,
    tokenizer,
    corpora: Sequence[str | EvalCorpus] | None = None,
    *,
    name: str = "model",
    max_tokens: int | None = 4096,
    seq_len: int = 512,
    batch_size: int = 4,
    progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Perplexity of ``model`` on each corpus (names, paths or :class:`EvalCorpus`), plus cost and routing.

    ``corpora`` defaults to :func:`~moeforge.eval.corpora.default_corpora` (built-in domains, and
    WikiText-2 / GSM8K when the benchmark data folder exists). Each corpus is cut to
    ``max_tokens`` tokens and scored in non-overlapping ``seq_len`` windows.
    """
    check_evaluable(model)
    resolved = unique_names([c if isinstance(c, EvalCorpus) else resolve_corpus(c) for c in (corpora or default_corpora())])
    # every corpus is tokenised and checked before the first forward pass
    token_ids = {}
    for corpus in resolved:
        ids = tokenize_corpus(tokenizer, corpus, max_tokens)
        if ids.numel() < 2:
            raise MoeforgeError(f"corpus {corpus.name!r} ({corpus.source}) has fewer than two tokens; give it more text.")
        token_ids[corpus.name] = ids
    window = max(min(seq_len, ids.numel()) for ids in token_ids.values())
    context = model_context(model)
    if context is not None and window > context:
        raise MoeforgeError(
            f"seq_len (--seq-len) {seq_len} gives windows of {window} tokens"
            + ("" if window == seq_len else " (all the tokens of the longest corpus)")
            + f", more than the model's context of {context} positions (max_position_embeddings); use --seq-len "
            f"{context} or less."
        )
    results: dict[str, CorpusResult] = {}
    snippets: dict[str, str] = {}
    overall = RoutingStats()
    per_corpus: dict[str, RoutingStats] = {}
    first = next(iter(token_ids.values()))
    evaluate_nll(model, first[: min(64, first.numel())], seq_len=seq_len)  # first-call overheads stay out of tokens/s
    for corpus in resolved:
        ids = token_ids[corpus.name]
        stats = RoutingStats()
        res: NLLResult = evaluate_nll(
            model, ids, seq_len=seq_len, batch_size=batch_size, on_routing=lambda r, _b: stats.update(r)
        )
        snippets[corpus.name] = corpus.text[:4000]
        results[corpus.name] = CorpusResult(corpus.name, corpus.source, res.perplexity, res.tokens, res.predictions, res.seconds)
        if stats:
            per_corpus[corpus.name] = stats
            overall = overall.merge(stats)
        if progress:
            progress(f"{corpus.name}: perplexity {res.perplexity:.2f} on {res.tokens:,} tokens ({res.tokens_per_second:,.0f} tokens/s)")
    return EvalReport(
        model=name,
        corpora=results,
        parameters=parameter_counts(model),
        flops_per_token=flops_per_token(model, seq_len=window),
        seq_len=window,
        routing=overall,
        routing_per_corpus=per_corpus,
        snippets=snippets,
        notes=routing_notes(model, batch_size),
    )


def unique_names(corpora: list[EvalCorpus]) -> list[EvalCorpus]:
    """Corpora with distinct names: files that share a stem are named ``folder/stem``, or by their
    whole file name (``folder/name.txt``) when that is not enough; a file given twice is refused."""

    def label(c: EvalCorpus, level: int) -> str:
        path = Path(c.source)
        base = c.name if level == 1 else path.name
        return f"{path.parent.name}/{base}" if path.parent.name else base

    out = list(corpora)
    for level in (1, 2):
        names = [c.name for c in out]
        out = [dataclasses.replace(c, name=label(c, level)) if names.count(c.name) > 1 and Path(c.source).is_file()
               else c for c in out]
    names = [c.name for c in out]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise MoeforgeError(f"corpus {', '.join(dupes)} given twice; name each corpus once.")
    return out


def check_evaluable(model) -> None:
    """Refuse a transformers MoE model that moeforge would count and score as dense."""
    from ..models import is_transformers_moe

    if is_transformers_moe(model):
        raise MoeforgeError(
            f"{type(model).__name__} is a transformers MoE model: moeforge would count all its experts as active "
            "and record no routing. Open it with moeforge.load(PATH) (save_pretrained it first if it is only in "
            "memory), which runs it on moeforge's MoE layer."
        )


def unrecorded_moe_layers(model) -> int:
    """MoE layers whose routing evaluation does not record: those of a CALM composition's augmenting
    model (only the anchor's routing is returned, and the two models' layer indices overlap)."""
    from ..compose.model import ComposedForCausalLM
    from ..moe.layer import MoELayer

    if not isinstance(model, ComposedForCausalLM):
        return 0
    return sum(isinstance(m, MoELayer) for m in model.augmenting.modules())


def expert_choice_routing(model) -> str | None:
    """"future" when a MoE layer of ``model`` routes by expert choice over whole sequences
    (allow_future_tokens), "causal" for causal expert choice (across the batch), else None."""
    from ..moe.layer import MoELayer

    configs = [m.config for m in model.modules() if isinstance(m, MoELayer) and m.config.router == "expert_choice"]
    if any(not c.expert_choice_causal for c in configs):
        return "future"
    return "causal" if configs else None


def routing_notes(model, batch_size: int) -> list[str]:
    """Caveats for routers whose results are not per-token functions of the text, and for MoE layers
    whose routing is not recorded."""
    notes = []
    unrecorded = unrecorded_moe_layers(model)
    if unrecorded:
        notes.append(
            f"the augmenting model has {unrecorded} MoE layer{'s' if unrecorded != 1 else ''}: the parameters and "
            "FLOPs count them, the routing statistics and plots do not (they show the anchor's MoE layers only)."
        )
    expert_choice = expert_choice_routing(model)
    if expert_choice == "future":
        notes.append(
            "expert-choice routing over whole sequences (allow_future_tokens): a token's experts depend on "
            "later tokens, so this perplexity is not that of a left-to-right language model."
        )
    elif expert_choice == "causal":
        notes.append(
            f"causal expert-choice routing: at each position every expert picks among the windows of one batch, so "
            f"the perplexity, the experts per token and the routing statistics depend on the batch size (here "
            f"{batch_size}, the last batch may be smaller); compare such models at one --batch-size."
        )
    return notes


def task_notes(model, batch_size: int) -> list[str]:
    """Caveats for task accuracy of models whose routing is not a per-token function of the text."""
    expert_choice = expert_choice_routing(model)
    if expert_choice == "future":
        return ["expert-choice routing over whole sequences (allow_future_tokens): a token's experts depend on later "
                "tokens and on the padding of its batch, so these scores are not those of a left-to-right language "
                "model."]
    if expert_choice == "causal":
        return [f"causal expert-choice routing: at each position every expert picks among the problems of one batch, "
                f"so the accuracy depends on the batch size (here {batch_size}) and on which problems share a batch; "
                "compare such models at one --batch-size."]
    return []


def write_analysis(
    report: EvalReport,
    out_dir: str | os.PathLike,
    *,
    model=None,
    tokenizer=None,
    html_tokens: int = 48,
) -> list[Path]:
    """Write the routing plots (and, given ``model`` and ``tokenizer``, the HTML token view) to ``out_dir``.

    Files: ``expert_load.png`` (layers x experts), ``domain_usage.png`` (per-corpus expert usage),
    ``routing.html`` (one segment of ``html_tokens`` tokens per corpus). Dense models have no
    routing, so nothing is written and an empty list is returned.
    """
    from ..analysis.html import capture_token_routing, write_routing_html
    from ..analysis.plots import plot_domain_usage, plot_load_heatmap

    if not report.is_moe:
        return []
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files = [plot_load_heatmap(report.routing, out / "expert_load.png", title=f"Expert load per layer: {report.model}")]
    files.append(plot_domain_usage(report.routing_per_corpus, out / "domain_usage.png", title=report.model))
    if model is not None and tokenizer is not None:
        segments = []
        for name, text in report.snippets.items():
            segments.append(capture_token_routing(model, tokenizer, text, label=name, max_tokens=html_tokens))
        experts = max(s.num_experts for s in report.routing.layers())
        files.append(write_routing_html(out / "routing.html", segments, title=f"Token routing: {report.model}",
                                        num_experts=experts))
    return files
