"""Claim 1 (LLaMA-MoE, Zhu et al. 2024): how experts are built, rescaled and routed decides quality.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/claim1_expert_construction.py --testbed testbed
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/claim1_expert_construction.py --testbed smollm2

For each MoE shape (8 experts top-2, 16 experts top-4) it converts the dense testbed model with
every expert construction method (random = IndependentRandom, cluster = IndependentClustering,
importance = SharingInner, upcycle = sparse upcycling), rescaling off or E/k (LLaMA-MoE's scalar),
and each router initialisation (random, centroid, activation), all through ``moeforge.convert``
in memory, and measures perplexity right after conversion. Then it continues pre-training a
subset (every method with the LLaMA-MoE setting of a random router, rescaling on and off, plus
every split method with its best router initialisation) for the same fixed short budget through
``moeforge.train`` and measures again.

LLaMA-MoE reports (sec. 4.3 / Fig. 3 and the rescaling ablation) that rescaling the experts'
output helps and that IndependentRandom is the best construction once trained. The script
writes its tables and what holds here into docs/results.md (section ``claim-1-<testbed>``).
Finished runs are cached in ``runs/claim1/<testbed>/results.json``, so rerunning resumes.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from common import REPO, TESTBEDS, Evaluator, ResultStore, command_line, fmt, get_testbed, run_cpt, set_threads, table

METHODS = ("random", "cluster", "importance", "upcycle")
SPLIT = ("random", "cluster", "importance")
GATES = ("random", "centroid", "activation")


def parse_shapes(text: str) -> list[tuple[int, int]]:
    out = []
    for part in text.split(","):
        e, k = part.lower().split("x")
        out.append((int(e), int(k)))
    return out


def rescale_value(flag: str, e: int, k: int):
    return "none" if flag == "off" else float(e) / k


def combos(shapes):
    for e, k in shapes:
        for method in METHODS:
            for rescale in ("off", "on"):
                for gate in GATES:
                    if method == "upcycle" and (rescale == "on" or gate != "random"):
                        continue  # copies of the full FFN: scale 1 and identical experts (no data to route on)
                    yield e, k, method, rescale, gate


def key(e, k, method, rescale, gate) -> str:
    return f"{e}x{k}/{method}/rescale-{rescale}/gate-{gate}"


def calibration_tokens(tb, e: int) -> int:
    """The testbed's calibration budget, raised to 256 tokens per expert (importance clusters windows into E groups)."""
    return max(tb.calibration_tokens, 256 * e)


def convert(tb, tokenizer, e, k, method, rescale, gate, seed):
    import moeforge

    t0 = time.perf_counter()
    report = moeforge.convert(tb.model, None, tokenizer=tokenizer, method=method, experts=e, top_k=k,
                              rescale=rescale_value(rescale, e, k), gate_init=gate, seed=seed,
                              calibration_tokens=calibration_tokens(tb, e), eval_tokens=0)
    return report, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--testbed", choices=("testbed", "smollm2"), required=True)
    ap.add_argument("--shapes", default="8x2,16x4", help="experts x top-k, comma-separated")
    ap.add_argument("--cpt-steps", type=int, default=None, help="CPT steps per run (default: 25 testbed, 8 smollm2)")
    ap.add_argument("--cpt-shapes", default=None, help="shapes that get CPT runs (default: all for testbed, 8x2 for smollm2)")
    ap.add_argument("--cpt-runs", choices=("full", "minimal"), default=None,
                    help="full: every split method with rescale on/off (random router) and with its best router init; "
                         "minimal: rescale on, random router only (default: full for testbed, minimal for smollm2)")
    ap.add_argument("--max-cpt-params", type=float, default=1e9,
                    help="skip CPT of MoEs with more total parameters (AdamW in float32 needs ~16 bytes each; "
                         "smollm2 upcycled to 16 experts has 1.3B)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--model", help="(smoke tests) another dense model for this testbed's settings")
    ap.add_argument("--eval-tokens", type=int, help="(smoke tests) fewer evaluation tokens")
    ap.add_argument("--out", type=Path, help="results folder (default runs/claim1/TESTBED)")
    args = ap.parse_args()
    set_threads()
    import dataclasses

    import moeforge

    tb = get_testbed(args.testbed) if not args.model else dataclasses.replace(TESTBEDS[args.testbed], model=args.model)
    if args.eval_tokens:
        tb = dataclasses.replace(tb, eval_tokens=args.eval_tokens)
    shapes = parse_shapes(args.shapes)
    if args.cpt_steps is not None and args.cpt_steps < 1:
        ap.error("--cpt-steps must be at least 1")
    cpt_steps = args.cpt_steps if args.cpt_steps is not None else (25 if tb.name == "testbed" else 8)
    cpt_shapes = parse_shapes(args.cpt_shapes) if args.cpt_shapes else (shapes if tb.name == "testbed" else shapes[:1])
    out = args.out or REPO / "runs" / "claim1" / tb.name
    store = ResultStore(out / "results.json")
    t_start = time.perf_counter()
    dense, tok = moeforge.load_with_tokenizer(tb.model)
    evaluator = Evaluator(tb, tok)
    if "dense" not in store:
        store.put("dense", {"ppl": evaluator(dense)})
    print(f"dense: {store['dense']['ppl']}", flush=True)
    del dense

    # ---------------------------------------------------------------- right after conversion
    for e, k, method, rescale, gate in combos(shapes):
        name = key(e, k, method, rescale, gate)
        if name in store:
            continue
        report, secs = convert(tb, tok, e, k, method, rescale, gate, args.seed)
        ppl = evaluator(report.model)
        store.put(name, {"ppl": ppl, "convert_s": secs, "parameters": report.parameters["moe"]})
        print(f"{name}: {ppl['primary']:.2f} ({secs:.0f}s)", flush=True)

    # ---------------------------------------------------------------- after a short CPT
    cpt_runs = []
    full = args.cpt_runs == "full" or (args.cpt_runs is None and tb.name == "testbed")
    for e, k in cpt_shapes:
        for method in SPLIT:
            for rescale in ("off", "on") if full else ("on",):
                cpt_runs.append((e, k, method, rescale, "random"))
            best_gate = min(GATES, key=lambda g: store[key(e, k, method, "on", g)]["ppl"]["primary"])
            if full and best_gate != "random":
                cpt_runs.append((e, k, method, "on", best_gate))
        cpt_runs.append((e, k, "upcycle", "off", "random"))
    tokens_per_run = cpt_steps * tb.cpt_batch * tb.cpt_seq_len
    for e, k, method, rescale, gate in cpt_runs:
        name = "cpt/" + key(e, k, method, rescale, gate)
        if name in store:
            continue
        total = store[key(e, k, method, rescale, gate)]["parameters"]["total"]
        if total > args.max_cpt_params:
            print(f"{name}: skipped, {total:,} parameters > --max-cpt-params {args.max_cpt_params:,.0f}", flush=True)
            continue
        report, _ = convert(tb, tok, e, k, method, rescale, gate, args.seed)
        result, _, secs = run_cpt(report.model, tok, tb, out / "cpt_tmp", steps=cpt_steps, seed=args.seed)
        ppl = evaluator(result.model)
        store.put(name, {"ppl": ppl, "train_s": secs, "tokens": result.tokens, "steps": result.steps})
        print(f"{name}: {ppl['primary']:.2f} after {result.tokens:,} tokens ({secs:.0f}s)", flush=True)
    wall = time.perf_counter() - t_start

    if not args.no_report:
        write_report(tb, store, shapes, cpt_runs, cpt_steps, tokens_per_run, wall, args)


def write_report(tb, store, shapes, cpt_runs, cpt_steps, tokens_per_run, wall, args) -> None:
    from moeforge.eval.report import device_description, update_section

    dense = store["dense"]["ppl"]["primary"]
    P = lambda name: store[name]["ppl"]["primary"] if name in store else None  # noqa: E731

    # table 1: right after conversion
    rows = []
    for e, k in shapes:
        for method in METHODS:
            for rescale in ("off", "on"):
                if method == "upcycle" and rescale == "on":
                    continue
                cells = [P(key(e, k, method, rescale, g)) for g in GATES]
                rows.append([f"{e}/{k}", method, "E/k = " + fmt(e / k, "g") if rescale == "on" else "none"]
                            + [fmt(c) for c in cells])
    t1 = table(["experts/top-k", "method", "rescale", *[f"router init: {g}" for g in GATES]], rows)

    # table 2: after CPT
    rows2 = []
    for e, k, method, rescale, gate in cpt_runs:
        n = key(e, k, method, rescale, gate)
        after = fmt(P("cpt/" + n)) if "cpt/" + n in store else (
            f"skipped: {store[n]['parameters']['total'] / 1e9:.2f}B parameters (> --max-cpt-params)"
            if n in store and store[n]["parameters"]["total"] > args.max_cpt_params else "-")
        rows2.append([f"{e}/{k}", method, "E/k" if rescale == "on" else "none", gate, fmt(P(n)), after])
    t2 = table(["experts/top-k", "method", "rescale", "router init", "after conversion", f"after CPT ({tokens_per_run:,} tokens)"], rows2)

    # what holds: rescaling, router init, best method after training
    verdicts = []
    wins = total = 0
    for e, k in shapes:
        for method in SPLIT:
            for g in GATES:
                a, b = P(key(e, k, method, "off", g)), P(key(e, k, method, "on", g))
                if a is not None and b is not None:
                    total += 1
                    wins += b < a
    verdicts.append(f"* **Rescaling right after conversion**: E/k rescaling gives lower perplexity than none in {wins} of {total} "
                    "(shape, split method, router init) cases.")
    wins = total = 0
    for e, k, method, rescale, gate in cpt_runs:
        if rescale == "on" and gate == "random":
            a, b = P("cpt/" + key(e, k, method, "off", gate)), P("cpt/" + key(e, k, method, "on", gate))
            if a is not None and b is not None:
                total += 1
                wins += b < a
    verdicts.append(f"* **Rescaling after CPT** (random router, as LLaMA-MoE): E/k better than none in {wins} of {total} cases.")
    for e, k in shapes:
        best = {}
        for method in SPLIT:
            vals = {g: P(key(e, k, method, "on", g)) for g in GATES}
            vals = {g: v for g, v in vals.items() if v is not None}
            if vals:
                best[method] = min(vals, key=vals.get)
        if best:
            verdicts.append(f"* **Router initialisation, {e}/{k}** (rescale on): best right after conversion: "
                            + ", ".join(f"{m}: {g}" for m, g in best.items()) + ".")
    for e, k in {(r[0], r[1]) for r in cpt_runs}:
        for rescale in ("on", "off"):
            after = {m: P("cpt/" + key(e, k, m, rescale, "random")) for m in SPLIT}
            after = {m: v for m, v in after.items() if v is not None}
            if len(after) == len(SPLIT):
                order = sorted(after, key=after.get)
                verdicts.append(f"* **Best split method after CPT, {e}/{k}, rescale {rescale}, random router**: "
                                + " < ".join(f"{m} ({after[m]:.2f})" for m in order)
                                + (" -- random splitting is best, as LLaMA-MoE reports." if order[0] == "random"
                                   else " -- random splitting is **not** best here."))
    first = [n for n in store.data if n.startswith("cpt/")]
    secs_convert = sum(v.get("convert_s", 0) for v in store.data.values() if isinstance(v, dict))
    secs_train = sum(store[n].get("train_s", 0) for n in first)
    md = f"""Testbed: **{tb.name}** ({tb.description}). Metric: {tb.primary_label}; the dense model scores **{fmt(dense)}**.
Conversions run in memory through `moeforge.convert` (seed {args.seed}, calibration: the embedded default text,
max({tb.calibration_tokens:,}, 256 x E) tokens); CPT through `moeforge.train` on the mixture
{", ".join(f"{d['name']} {d['weight']}" for d in tb.cpt_data)} (static), lr {tb.cpt_lr:g}, batch {tb.cpt_batch} x {tb.cpt_seq_len} tokens,
warmup {max(1, cpt_steps // 10)}, cosine to 0.1x, fp32.

* Command: `{command_line()}`
* Device: {device_description()} (shared with other jobs; no GPU).
* Budget: {len([n for n in store.data if not n.startswith('cpt/') and n != 'dense'])} conversions, CPT {cpt_steps} steps = {tokens_per_run:,} tokens per run x {len(first)} runs;
  wall time {wall / 60:.0f} min in the last invocation (conversions {secs_convert / 60:.0f} min, CPT {secs_train / 60:.0f} min over all invocations).

Perplexity right after conversion (upcycling copies the whole FFN into every expert, so it keeps scale 1 and only a random router makes sense;
with renormalised top-k it reproduces the dense model exactly, at k times the dense FFN's active parameters):

{t1}

After the fixed short CPT budget:

{t2}

What holds here:

{chr(10).join(verdicts)}
"""
    update_section(f"claim-1-{tb.name}", md, title=f"Claim 1: expert construction on {tb.title}")
    print(f"wrote docs/results.md section claim-1-{tb.name}")


if __name__ == "__main__":
    main()
