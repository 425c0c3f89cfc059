"""``moeforge eval MODEL``: perplexity per corpus, task accuracy, speed, cost and (for MoE models) routing per layer."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path

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
        print("\nno routing statistics: " + ("no MoE layer recorded its routing (see the note above)" if report.notes
                                           else "dense model"))
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


def print_tasks(results, model: str, parameters: dict | None = None, notes: Sequence[str] = ()) -> None:
    """Table of :class:`~moeforge.eval.tasks.TaskResult` (accuracy with its 95% interval), then ``notes``."""
    if parameters is not None:
        print(f"model: {model}")
        print(f"parameters: {parameters['total']:,} total, {parameters['active']:,} active per token")
    width = max(10, *(len(r.name) for r in results))
    print(f"\n{'task':<{width}}  {'kind':<8}  {'accuracy':>8}  {'95% interval':>13}  {'problems':>8}  {'shots':>5}  "
          f"{'prompts':<7}  {'seconds':>7}  source")
    for r in results:
        lo, hi = r.interval
        prompts = "chat" if r.chat else "plain"
        print(f"{r.name:<{width}}  {r.kind:<8}  {r.accuracy:>8.1%}  {f'{lo:.1%}-{hi:.1%}':>13}  {r.total:>8,}  "
              f"{r.shots:>5}  {prompts:<7}  {r.seconds:>7.1f}  {r.source}")
        if r.accuracy_norm is not None:
            print(f"{'':<{width}}  {'':<8}  {r.accuracy_norm:>8.1%}  (highest log-likelihood per character)")
    for note in notes:
        print(f"note: {note}")


def register(app: typer.Typer) -> None:
    @app.command("eval")
    def eval_(
        model: str = typer.Argument(..., metavar="MODEL", help="Model path, GGUF file or alias (smollm2)."),
        data: list[str] = typer.Option(
            None, "--data", "-d", metavar="CORPUS",
            help="Corpus name (prose, code, arithmetic, wikitext2, gsm8k) or a text (.txt, .md, .text) or JSON "
                 "(.jsonl, .json) file; repeat for several. "
                 "Default: the built-in domains plus WikiText-2 and GSM8K when the benchmark data folder exists, "
                 "unless --task is given.",
        ),
        task: list[str] = typer.Option(
            None, "--task", "-t", metavar="TASK",
            help="Accuracy task: arithmetic, arithmetic-choice, gsm8k, or a .jsonl file of question/answer "
                 "(or question/choices/answer) records; repeat for several. With --task and no --data, "
                 "perplexity is skipped.",
        ),
        limit: int = typer.Option(None, "--limit", min=1, help="Problems per task (default: all; built-in "
                                  "arithmetic tasks: 500)."),
        shots: int = typer.Option(0, "--shots", min=0, help="Solved examples shown before each problem."),
        chat: str = typer.Option("auto", "--chat", help="Task prompts through the tokenizer's chat template: "
                                 "auto (when it has one), on, or off (plain text)."),
        max_new_tokens: int = typer.Option(None, "--max-new-tokens", min=1,
                                           help="Tokens generated per problem (default: the task's, gsm8k 256)."),
        samples: str = typer.Option(None, "--samples", help="JSONL file for every problem's prompt, reply and "
                                    "verdict."),
        as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables."),
        max_tokens: int = typer.Option(None, "--max-tokens", min=2, help="Tokens per corpus (default 4096)."),
        seq_len: int = typer.Option(None, "--seq-len", min=2, help="Window length for perplexity (default 512)."),
        batch_size: int = typer.Option(4, "--batch-size", min=1, help="Windows per forward pass."),
        plots: str = typer.Option(None, "--plots", help="Directory for expert_load.png, domain_usage.png and routing.html."),
        html_tokens: int = typer.Option(None, "--html-tokens", min=1,
                                        help="Tokens per corpus shown in routing.html (default 48)."),
        dtype: str = typer.Option("float32", help="float32, bfloat16 or float16."),
        allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Accept pickle (.bin) checkpoints."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run custom model code from the checkpoint."),
    ) -> None:
        """Perplexity of MODEL per corpus, task accuracy, tokens/s, parameters and FLOPs per token, and routing per layer."""
        from ..errors import MoeforgeError
        from ..eval.corpora import resolve_corpus
        from ..eval.evaluate import evaluate, task_notes, unique_names, write_analysis
        from ..eval.tasks import CHAT_MODES, CHOICE, evaluate_task, resolve_tasks
        from ..loading import load_tokenizer, load_trained
        from ..utils.io import atomic_write_text, check_writable_dir

        corpora = unique_names([resolve_corpus(d) for d in data]) if data else None  # bad names fail before loading
        tasks = resolve_tasks(task or [], limit)
        if chat not in CHAT_MODES:
            raise MoeforgeError(f"--chat must be one of {', '.join(CHAT_MODES)}, got {chat!r}.")
        if not tasks and (limit is not None or samples or max_new_tokens is not None or shots):
            raise MoeforgeError("--limit, --shots, --max-new-tokens and --samples apply to tasks; add --task NAME.")
        if max_new_tokens is not None and tasks and all(t.kind == CHOICE for t in tasks):
            raise MoeforgeError("--max-new-tokens sets the reply length of generation tasks, and every task given is "
                                "multiple choice (scored without generating); leave --max-new-tokens out.")
        corpus_options = {"--plots": plots, "--max-tokens": max_tokens, "--seq-len": seq_len, "--html-tokens": html_tokens}
        given = [name for name, value in corpus_options.items() if value is not None]
        if tasks and not data and given:
            raise MoeforgeError(f"{', '.join(given)} appl{'ies' if len(given) == 1 else 'y'} to the perplexity corpora, "
                                "and with --task and no --data no corpus is scored; add --data CORPUS (e.g. -d prose) "
                                f"or leave {', '.join(given)} out.")
        max_tokens = 4096 if max_tokens is None else max_tokens
        seq_len = 512 if seq_len is None else seq_len
        html_tokens = 48 if html_tokens is None else html_tokens
        if plots:
            check_writable_dir(plots, "--plots directory")  # before the evaluation, not after it
        if samples:
            if Path(samples).expanduser().is_dir():
                raise MoeforgeError(f"--samples {samples} is a directory; name a file, e.g. {Path(samples) / 'samples.jsonl'}.")
            check_writable_dir(str(Path(samples).expanduser().resolve().parent), "--samples file's directory")
        tok = load_tokenizer(model, trust_remote_code=trust_remote_code)  # the cheap half first: a missing tokenizer fails before the weights load
        m = load_trained(model, dtype=dtype, allow_pickle=allow_pickle, trust_remote_code=trust_remote_code)
        log = None if as_json else (lambda msg: print(msg, file=sys.stderr, flush=True))
        results = []
        notes = task_notes(m, batch_size) if tasks else []
        for t in tasks:
            results.append(evaluate_task(m, tok, t, shots=shots, chat=chat, batch_size=batch_size,
                                         max_new_tokens=max_new_tokens, progress=log))
            if log:
                log(f"{t.name}: accuracy {results[-1].accuracy:.1%} on {results[-1].total:,} problems")
        if samples:
            lines = [json.dumps({"task": r.name, **s}) for r in results for s in r.samples]
            atomic_write_text(Path(samples).expanduser(), "\n".join(lines) + "\n")
        if tasks and not data:
            from ..eval.cost import parameter_counts

            if as_json:
                print(json.dumps({"model": model, "parameters": parameter_counts(m),
                                  "tasks": {r.name: r.to_dict() for r in results}, "notes": notes}))
            else:
                print_tasks(results, model, parameter_counts(m), notes)
                if samples:
                    print(f"wrote {samples}")
            return
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
            if results:
                out["tasks"] = {r.name: r.to_dict() for r in results}
                out["notes"] += [n for n in notes if n not in out["notes"]]
            print(json.dumps(out))
        else:
            print_report(report)
            if results:
                print_tasks(results, model, notes=notes)
                if samples:
                    print(f"wrote {samples}")
            if plots and not files and plot_error is None:
                print(f"\n(no plots written to {plots}: no MoE layer recorded its routing)")
            for f in files:
                print(f"wrote {f}")
        if plot_error:
            raise MoeforgeError(plot_error)
