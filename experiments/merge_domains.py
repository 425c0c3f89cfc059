"""Merging domain fine-tunes into one MoE (``moeforge convert --method merge``) on SmolLM2.

Branch-Train-MiX (Sukhbaatar et al. 2024) and mergekit-moe build an MoE whose experts are the
FFNs of several fine-tunes of one seed model; the merged model should be about as good as each
specialist on its own domain, at one specialist's active compute per token. This script checks
that on SmolLM2-135M-Instruct with the built-in domains:

1. fine-tunes the dense model on ``code`` and on ``arithmetic`` (``moeforge.train``, full
   fine-tune, the domains' train split);
2. merges [SmolLM2, code fine-tune, arithmetic fine-tune] into a 3-expert top-1 MoE with
   ``--gate-init domain`` (the router fitted on prose / code / arithmetic train text), once with
   the base model's attention (``--merge-shared base``, mergekit-moe) and once with the average
   (``--merge-shared average``, BTX);
3. measures held-out perplexity (the domains' validation split) of every model on each domain,
   and the share of each domain's tokens that the merged model routes to that domain's expert.

Run (about 30 minutes on the project's 2-core CPU with the defaults; 28 on 2026-11-23)::

    OMP_NUM_THREADS=2 .venv/bin/python experiments/merge_domains.py [--steps 30] [--out runs/merge_domains]

The table goes to docs/results.md (section merging-domain-fine-tunes) and runs/merge_domains/result.json.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import moeforge  # noqa: E402
from moeforge.eval.evaluate import evaluate  # noqa: E402
from moeforge.eval.report import device_description, update_section  # noqa: E402
from moeforge.train import train  # noqa: E402

DOMAINS = ("prose", "code", "arithmetic")
SECTION = "## Merging domain fine-tunes"
DEFAULT_DEVICE = "the project's 2-core CPU"  # results recorded before the device was


def fine_tune(domain: str, out: Path, args) -> Path:
    final = out / "final"
    if (final / "config.json").is_file():
        return final
    train({"model": "smollm2", "output_dir": str(out), "data": [{"name": domain, "builtin": domain}],
           "steps": args.steps, "batch_size": args.batch, "seq_len": args.seq_len, "lr": args.lr,
           "warmup_steps": max(1, args.steps // 10), "save_every": args.steps, "log_every": 5, "eval_every": 0,
           "eval_tokens": 2048, "seed": 0, "device": "cpu"})
    return final


def routing_shares(model, tok, tokens: int) -> dict[str, float]:
    """Share of each domain's held-out tokens routed to that domain's expert, over every MoE layer."""
    from moeforge.eval.corpora import resolve_corpus, tokenize_corpus

    shares = {}
    for expert, domain in enumerate(DOMAINS):
        ids = tokenize_corpus(tok, resolve_corpus(domain), tokens)[: 512 * (tokens // 512)].view(-1, 512)
        hits = total = 0
        with torch.no_grad():
            for row in ids:
                for r in model(row[None], output_routing=True).routing:
                    hits += int((r.expert_index == expert).sum())
                    total += r.expert_index.numel()
        shares[domain] = hits / total
    return shares


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/merge_domains")
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--calibration-tokens", type=int, default=6144)
    ap.add_argument("--eval-tokens", type=int, default=4096)
    ap.add_argument("--no-report", action="store_true", help="do not rewrite docs/results.md")
    ap.add_argument("--report-only", action="store_true", help="rewrite docs/results.md from OUT/result.json (no runs)")
    args = ap.parse_args()
    if args.report_only:
        write_report(json.loads((Path(args.out) / "result.json").read_text()))
        return
    out = Path(args.out)
    t0 = time.perf_counter()
    tuned = {d: fine_tune(d, out / f"{d}-ft", args) for d in ("code", "arithmetic")}
    t_train = time.perf_counter() - t0
    experts = ["smollm2", str(tuned["code"]), str(tuned["arithmetic"])]
    merged = {}
    for shared in ("base", "average"):
        path = out / f"merged-{shared}"
        if not (path / "config.json").is_file():
            moeforge.convert("smollm2", path, overwrite=True, method="merge", expert_models=experts, top_k=1,
                             merge_shared=shared, gate_init="domain", expert_data=list(DOMAINS),
                             calibration_tokens=args.calibration_tokens, eval_tokens=0, progress=print)
        merged[shared] = path
    results = {}
    names = {"SmolLM2 (dense)": "smollm2", "code fine-tune (dense)": tuned["code"],
             "arithmetic fine-tune (dense)": tuned["arithmetic"],
             "merged, 3 experts top-1, base attention": merged["base"],
             "merged, 3 experts top-1, averaged attention": merged["average"]}
    shares = {}
    for label, path in names.items():
        model, tok = moeforge.load_with_tokenizer(str(path))
        report = evaluate(model, tok, list(DOMAINS), max_tokens=args.eval_tokens, seq_len=512)
        results[label] = {d: report.perplexity[d] for d in DOMAINS}
        results[label]["active_parameters"] = report.parameters["active"]
        if "merged" in label:
            shares[label] = routing_shares(model, tok, args.eval_tokens)
        print(label, results[label], shares.get(label))
    record = {"date": datetime.date.today().isoformat(), "device": device_description(), "args": vars(args),
              "seconds_training": t_train,
              "seconds_total": time.perf_counter() - t0, "perplexity": results, "own_expert_share": shares,
              "torch": torch.__version__, "threads": torch.get_num_threads()}
    (out / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    if not args.no_report:
        write_report(record)


def write_report(record: dict) -> None:
    a = record["args"]
    lines = [f"`OMP_NUM_THREADS=2 .venv/bin/python experiments/merge_domains.py --steps {a['steps']}` on {record['date']}, "
             f"{record.get('device') or DEFAULT_DEVICE + ', torch ' + record['torch']}, {record['threads']} torch threads; "
             f"{record['seconds_total'] / 60:.0f} min in all (on a CPU shared with other jobs). Two full fine-tunes of SmolLM2-135M-Instruct "
             f"({a['steps']} steps x {a['batch']} x {a['seq_len']} tokens, lr {a['lr']}, each on one built-in "
             "domain's train split), merged with SmolLM2 itself into 3 experts, top-1, router by "
             f"`--gate-init domain` on {a['calibration_tokens']:,} train tokens of prose / code / arithmetic. "
             f"Perplexity on each domain's held-out split ({a['eval_tokens']:,} tokens, 512-token windows):", "",
             "| model | active params | prose | code | arithmetic |", "|---|---:|---:|---:|---:|"]
    for label, row in record["perplexity"].items():
        lines.append(f"| {label} | {row['active_parameters'] / 1e6:.1f}M | " +
                     " | ".join(f"{row[d]:.2f}" for d in DOMAINS) + " |")
    ppl = record["perplexity"]
    dense = {k: v for k, v in ppl.items() if "(dense)" in k}
    merged_label = next(k for k in ppl if "averaged" in k)
    merged = ppl[merged_label]
    parts = []
    for d in DOMAINS:
        best = min(dense, key=lambda k: dense[k][d])
        parts.append(f"{d} {merged[d]:.2f} vs {dense[best][d]:.2f} ({best.removesuffix(' (dense)')})")
    extra = merged["active_parameters"] - ppl["SmolLM2 (dense)"]["active_parameters"]
    best = {d: min(v[d] for v in dense.values()) for d in DOMAINS}
    worst_gap = min(max(v[d] / best[d] for d in DOMAINS) for v in dense.values()) - 1
    merged_gap = max(merged[d] / best[d] for d in DOMAINS) - 1
    lines += ["", f"On every domain the merged model with averaged attention comes close to the best dense model for "
              f"that domain ({'; '.join(parts)}; at most {merged_gap:.1%} above) at one dense model's active "
              f"parameters plus {extra:,} router weights, while every dense model is at least {worst_gap:.0%} above "
              "the best on some domain. (The built-in prose is Python's own documentation, so the code fine-tune "
              "helps it too.) Taking the base model's attention "
              "(mergekit-moe) instead of the average (BTX) costs a little everywhere, since the fine-tunes' FFNs "
              "were trained with their own attention."]
    lines += ["", "Share of each domain's held-out tokens that the merged model sends to that domain's expert "
              "(all 30 layers):", "", "| merged model | prose -> expert 0 | code -> expert 1 | arithmetic -> expert 2 |",
              "|---|---:|---:|---:|"]
    for label, row in record["own_expert_share"].items():
        lines.append(f"| {label} | " + " | ".join(f"{row[d]:.1%}" for d in DOMAINS) + " |")
    update_section("merging-domain-fine-tunes", "\n".join(lines), title=SECTION.removeprefix("## "))


if __name__ == "__main__":
    main()
