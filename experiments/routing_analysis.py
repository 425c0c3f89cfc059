"""Routing analysis of converted models: expert load per layer, expert usage per domain, token view.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/routing_analysis.py

Evaluates, through ``moeforge.eval.evaluate`` (what ``moeforge eval --plots`` runs):

* ``testbed-cpt``: the testbed MoE (8 experts top-2, IndependentRandom) after claim 2's static CPT
  run (``runs/claim2/testbed/models/static``; run experiments/claim2_cpt_recovery.py first);
* ``testbed-converted``: the same conversion right after ``moeforge.convert`` (no training);
* ``smollm2-cluster``: SmolLM2-135M converted to 8 experts top-2 with clustered experts and the
  activation-fitted router, right after conversion.

For each it writes the expert-load heatmap, the per-domain usage plot and the HTML token view to
``docs/img/routing/<name>/``, screenshots the HTML page in headless Chromium
(``scripts/check_routing_html.py``), and writes the section ``routing-analysis`` of docs/results.md
with per-model routing summaries (load CV, entropies, I(domain; expert) per layer).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time

from common import REPO, command_line, fmt, set_threads, table

CORPORA = ("prose", "code", "arithmetic")
MODELS = ("testbed-cpt", "testbed-converted", "smollm2-cluster")


def models(which: list[str]):
    import moeforge

    testbed = REPO / "runs" / "testbed" / "dense"
    cpt = REPO / "runs" / "claim2" / "testbed" / "models" / "static"
    if "testbed-cpt" in which:
        if (cpt / "config.json").is_file():
            yield "testbed-cpt", "testbed MoE 8/2 (random split, E/k) after claim 2's static CPT", *moeforge.load_with_tokenizer(cpt)
        else:
            print(f"skipping testbed-cpt: {cpt} is missing (run experiments/claim2_cpt_recovery.py --testbed testbed)")
    if "testbed-converted" in which and not (testbed / "config.json").is_file():
        print(f"skipping testbed-converted: {testbed} is missing (run experiments/testbed.py)")
    elif "testbed-converted" in which:
        tok = moeforge.load_tokenizer(testbed)
        r = moeforge.convert(testbed, None, tokenizer=tok, method="random", experts=8, top_k=2, rescale="auto",
                             gate_init="random", seed=0, calibration_tokens=2048, eval_tokens=0)
        yield "testbed-converted", "testbed MoE 8/2 (random split, E/k, random router) right after conversion", r.model, tok
    if "smollm2-cluster" in which:
        tok = moeforge.load_tokenizer("smollm2")
        r = moeforge.convert("smollm2", None, tokenizer=tok, method="cluster", experts=8, top_k=2, rescale="auto",
                             gate_init="activation", seed=0, calibration_tokens=2048, eval_tokens=0)
        yield "smollm2-cluster", "smollm2 MoE 8/2 (balanced k-means experts, E/k, activation-fitted router) right after conversion", r.model, tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--max-tokens", type=int, default=1024, help="tokens per domain")
    ap.add_argument("--no-report", action="store_true")
    args = ap.parse_args()
    chosen = args.models.split(",")
    unknown = [m for m in chosen if m not in MODELS]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS)}")
    if set(chosen) != set(MODELS) and not args.no_report:
        ap.error("the docs section lists every model, so a subset cannot rewrite it: run all of them, or add --no-report")
    set_threads()
    from moeforge.analysis.stats import specialisation
    from moeforge.eval.evaluate import evaluate, write_analysis
    from moeforge.eval.report import device_description, update_section

    t0 = time.perf_counter()
    parts = []
    for name, desc, model, tok in models(args.models.split(",")):
        seq = 256 if name.startswith("testbed") else 512
        report = evaluate(model, tok, list(CORPORA), name=name, max_tokens=args.max_tokens, seq_len=seq)
        out = REPO / "docs" / "img" / "routing" / name
        write_analysis(report, out, model=model, tokenizer=tok, html_tokens=40)
        shot = subprocess.run([sys.executable, str(REPO / "scripts" / "check_routing_html.py"), "--html", str(out / "routing.html"),
                               "--out", str(out)], capture_output=True, text=True)
        print(shot.stdout.strip() or shot.stderr.strip()[-500:], flush=True)
        spec = specialisation(report.routing_per_corpus)
        layers = report.routing.layers()
        rows = [[s.layer, fmt(s.cv), fmt(s.load_entropy, ".3f"), fmt(s.router_entropy, ".3f"), fmt(s.max_over_mean),
                 fmt(spec.get(s.layer), ".4f")] for s in layers]
        if len(rows) > 10:  # long models: first, every few, last
            step = max(1, len(rows) // 8)
            rows = rows[::step] + ([rows[-1]] if (len(rows) - 1) % step else [])
        summ = report.routing.summary()
        rel = lambda p: p.relative_to(REPO / "docs").as_posix()  # noqa: E731
        ppl = ", ".join(f"{c} {fmt(v)}" for c, v in report.perplexity.items())
        parts.append(f"""### {name}

{desc}. Perplexity ({args.max_tokens:,} held-out tokens per domain): {ppl}. Parameters: {report.parameters['total']:,} total,
{report.parameters['active']:,} active per token. Mean over layers: load CV {summ['mean_cv']:.3f}, normalised load entropy
{summ['mean_load_entropy']:.3f}, router entropy {summ['mean_router_entropy']:.3f} nats, dropped tokens {summ['dropped_fraction']:.1%};
mean I(domain; expert) {sum(spec.values()) / max(1, len(spec)):.4f} nats.

{table(["layer", "load CV", "H(load)/log E", "router entropy (nats)", "max/mean load", "I(domain; expert) nats"], rows)}

![expert load]({rel(out / 'expert_load.png')})
![domain usage]({rel(out / 'domain_usage.png')})

Token view: [{rel(out / 'routing.html')}]({rel(out / 'routing.html')}) (self-contained HTML), as rendered by headless Chromium:

![token routing]({rel(out / 'routing.png')})
""")
        del model
    if args.no_report or not parts:
        return
    if len(parts) < len(chosen):
        print("docs section not rewritten: some models were skipped (see above)")
        return
    md = f"""What the routers do, measured with `moeforge.eval.evaluate` / `write_analysis` (the code behind
`moeforge eval MODEL --plots DIR`) on the built-in domains' held-out text. Load = share of (token, expert) pairs per expert;
CV = std/mean of the load (0 = balanced); H(load)/log E = 1 for uniform use; router entropy = mean entropy of each token's
router distribution; I(domain; expert) = mutual information between a token's domain and its experts (0 = no specialisation).

* Command: `{command_line()}`
* Device: {device_description()} (shared; no GPU). Wall time {(time.perf_counter() - t0) / 60:.0f} min.

{chr(10).join(parts)}"""
    update_section("routing-analysis", md, title="Routing analysis of converted models")
    print("wrote docs/results.md section routing-analysis")


if __name__ == "__main__":
    main()
