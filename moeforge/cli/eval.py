"""``moeforge eval MODEL``: perplexity per corpus, speed, cost and (for MoE models) routing per layer."""

from __future__ import annotations

import json
import sys

import typer


def _fmt(value: float, spec: str = ".2f") -> str:
    return "-" if value != value else format(value, spec)


def print_report(report) -> None:
    """Human-readable tables of an :class:`~moeforge.eval.evaluate.EvalReport`."""
    p = report.parameters
    print(f"model: {report.model}")
    print(f"parameters: {p['total']:,} total, {p['active']:,} active per token "
          f"({p['active'] / p['total']:.1%}); forward FLOPs per token: {report.flops_per_token / 1e6:,.1f} M "
          f"(at {report.seq_len}-token context)")
    width = max(10, *(len(n) for n in report.corpora))
    print(f"\n{'corpus':<{width}}  {'perplexity':>10}  {'tokens':>7}  {'tokens/s':>8}  source")
    for name, r in report.corpora.items():
        print(f"{name:<{width}}  {r.perplexity:>10.2f}  {r.tokens:>7,}  {r.tokens_per_second:>8,.0f}  {r.source}")
    print(f"overall forward throughput: {report.tokens_per_second:,.0f} tokens/s")
    for note in report.notes:
        print(f"note: {note}")
    if not report.is_moe:
        print("\ndense model: no routing statistics")
        return
    from ..analysis.stats import specialisation

    spec = specialisation(report.routing_per_corpus)
    print("\nrouting per MoE layer (all corpora together): load = share of (token, expert) pairs per expert")
    print(f"{'layer':>5}  {'CV':>5}  {'H(load)':>7}  {'H(router)':>9}  {'max/mean':>8}  {'dropped':>7}  {'I(dom;exp)':>10}  load %")
    for s in report.routing.layers():
        load = " ".join(f"{100 * f:4.1f}" for f in s.load_fraction)
        print(f"{s.layer:>5}  {_fmt(s.cv):>5}  {_fmt(s.load_entropy, '.3f'):>7}  {_fmt(s.router_entropy, '.3f'):>9}  "
              f"{_fmt(s.max_over_mean):>8}  {s.dropped_fraction:>7.1%}  {_fmt(spec.get(s.layer, float('nan')), '.4f'):>10}  {load}")
    summary = report.routing.summary()
    print(f"mean over layers: CV {summary['mean_cv']:.3f}, normalised load entropy {summary['mean_load_entropy']:.3f}, "
          f"router entropy {summary['mean_router_entropy']:.3f} nats, {summary['experts_per_token']:.2f} experts per "
          f"token, dropped {summary['dropped_fraction']:.2%}")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        model: str = typer.Argument(..., metavar="MODEL", help="Model path, GGUF file or alias (smollm2)."),
        data: list[str] = typer.Option(
            None, "--data", "-d", metavar="CORPUS",
            help="Corpus name (prose, code, arithmetic, wikitext2, gsm8k) or a text (.txt, .md, .text) or JSON "
                 "(.jsonl, .json) file; repeat for several. "
                 "Default: the built-in domains plus WikiText-2 and GSM8K when the benchmark data folder exists.",
        ),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
        max_tokens: int = typer.Option(4096, "--max-tokens", min=2, help="Tokens per corpus."),
        seq_len: int = typer.Option(512, "--seq-len", min=2, help="Window length for perplexity."),
        batch_size: int = typer.Option(4, "--batch-size", min=1, help="Windows per forward pass."),
        plots: str = typer.Option(None, "--plots", help="Directory for expert_load.png, domain_usage.png and routing.html."),
        html_tokens: int = typer.Option(48, "--html-tokens", min=1, help="Tokens per corpus shown in routing.html."),
        dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
        allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickle (.bin) checkpoints."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run custom model code from the checkpoint."),
    ) -> None:
        """Perplexity of MODEL per corpus, tokens/s, parameters and FLOPs per token, and routing per layer."""
        from ..errors import MoeforgeError
        from ..eval.corpora import resolve_corpus
        from ..eval.evaluate import evaluate, unique_names, write_analysis
        from ..loading import load_tokenizer, load_trained

        corpora = unique_names([resolve_corpus(d) for d in data]) if data else None  # bad names fail before loading
        if plots:
            from ..utils.io import check_writable_dir

            check_writable_dir(plots, "--plots directory")  # before the evaluation, not after it
        tok = load_tokenizer(model, trust_remote_code=trust_remote_code)  # the cheap half first: a missing tokenizer fails before the weights load
        m = load_trained(model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        log = None if as_json else (lambda msg: print(msg, file=sys.stderr, flush=True))
        report = evaluate(m, tok, corpora, name=model, max_tokens=max_tokens, seq_len=seq_len,
                          batch_size=batch_size, progress=log)
        files, plot_error = [], None
        if plots:
            try:
                files = write_analysis(report, plots, model=m, tokenizer=tok, html_tokens=html_tokens)
            except OSError as err:  # the measurements are printed all the same, then the error
                plot_error = f"could not write the plots to {plots}: {err.strerror or err}"
        if as_json:
            out = report.to_dict()
            out["files"] = [str(f) for f in files]
            print(json.dumps(out))
        else:
            print_report(report)
            if plots and not files and plot_error is None:
                print(f"\n(no plots written to {plots}: the model has no MoE layers)")
            for f in files:
                print(f"wrote {f}")
        if plot_error:
            raise MoeforgeError(plot_error)
