"""Perplexity right after conversion: expert construction x router init x rescale on SmolLM2.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/convert_quality.py            # all presets
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/convert_quality.py --only coact-act-fit

Each preset converts SmolLM2-135M-Instruct (8 experts, top-2 unless the preset says otherwise) in
memory with ``moeforge.convert`` and measures perplexity with no training at all, on
(a) the held-out embedded prose (the built-in ``prose`` valid split, 4,096 tokens) and
(b) WikiText-2 test, first 8,192 tokens in 512-token windows (the protocol of the reference
figure 29.6; needs the benchmark data folder, skipped without it).
It prints one table and writes it to docs/results.md (section ``convert-quality``). Finished
presets are cached in runs/convert_quality/results.json with the options they were measured
under, so a rerun resumes; a rerun with other --model / token options refuses to mix the two
(``--fresh`` starts over), and ``--redo NAMES`` measures presets again after a code change.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

import moeforge  # noqa: E402
from moeforge.eval.corpora import available_benchmarks, resolve_corpus, tokenize_corpus  # noqa: E402
from moeforge.eval.cost import parameter_counts  # noqa: E402
from moeforge.eval.perplexity import evaluate_nll  # noqa: E402

#: name -> (description, moeforge.convert options)
PRESETS: dict[str, tuple[str, dict]] = {
    "random-random-auto": ("LLaMA-MoE IndependentRandom, random router, E/k", dict(method="random", gate_init="random", rescale="auto")),
    "random-random-fit": ("random split, random router, fitted scale", dict(method="random", gate_init="random", rescale="fit")),
    "cluster-random-auto": ("LLaMA-MoE IndependentClustering, random router, E/k", dict(method="cluster", gate_init="random", rescale="auto")),
    "cluster-centroid-fit": ("clustering, centroid router, fitted scale", dict(method="cluster", gate_init="centroid", rescale="fit")),
    "cluster-act-fit": ("clustering, activation router, fitted scale", dict(method="cluster", gate_init="activation", rescale="fit")),
    "coact-act-layerwise": ("co-activation, activation router, norm-matched scale", dict(method="coactivation", gate_init="activation", rescale="layerwise")),
    "coact-act-fit": ("co-activation, activation router, fitted scale", dict(method="coactivation", gate_init="activation", rescale="fit")),
    "coact-act-fit-refine": ("co-activation, activation router, fitted scale, --refine router", dict(method="coactivation", gate_init="activation", rescale="fit", refine="router")),
    "coact-act-fit-down": ("co-activation, activation router, fitted scale, --refine down", dict(method="coactivation", gate_init="activation", rescale="fit", refine="down")),
    "coact-act-fit-router-down": ("co-activation, activation router, fitted scale, --refine router+down", dict(method="coactivation", gate_init="activation", rescale="fit", refine="router+down")),
    "coact-act-fit-down-32k": ("as coact-act-fit-down with 32,768 calibration tokens", dict(method="coactivation", gate_init="activation", rescale="fit", refine="down", calibration_tokens=32768)),
    "coact-7e1s-k1-act-fit-down": ("co-activation 7 routed top-1 + 1 shared, --refine down (same active width)", dict(method="coactivation", experts=7, top_k=1, shared_experts=1, gate_init="activation", rescale="fit", refine="down")),
    "random-random-fit-down": ("random split, random router, fitted scale, --refine down", dict(method="random", gate_init="random", rescale="fit", refine="down")),
    "importance-act-fit": ("LLaMA-MoE SharingInner, activation router, fitted scale", dict(method="importance", gate_init="activation", rescale="fit")),
    "importance-7e1s-k1-act-fit": ("SharingInter: 7 routed top-1 + 1 shared (same active width)", dict(method="importance", experts=7, top_k=1, shared_experts=1, gate_init="activation", rescale="fit")),
    "coact-7e1s-k1-act-fit": ("co-activation: 7 routed top-1 + 1 shared (same active width)", dict(method="coactivation", experts=7, top_k=1, shared_experts=1, gate_init="activation", rescale="fit")),
    "granular-g4-random-auto": ("granular upcycling G=4 (experts of I/4), virtual-group router, scale G", dict(method="granular-upcycle", granularity=4, gate_init="random", rescale="auto")),
    "upcycle-random-auto": ("sparse upcycling (each expert a full copy; 2x dense FFN active)", dict(method="upcycle", gate_init="random", rescale="auto")),
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--only", default=None, help="comma-separated preset names")
    ap.add_argument("--prose-tokens", type=int, default=4096)
    ap.add_argument("--wiki-tokens", type=int, default=8192)
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--no-report", action="store_true")
    ap.add_argument("--redo", default="", help="comma-separated presets to measure again (e.g. after a code change)")
    ap.add_argument("--fresh", action="store_true", help="discard every cached result")
    args = ap.parse_args()
    names = args.only.split(",") if args.only else list(PRESETS)
    redo = [n for n in args.redo.split(",") if n]
    unknown = [n for n in names + redo if n not in PRESETS]
    if unknown:
        ap.error(f"unknown preset(s) {', '.join(unknown)}; choose from {', '.join(PRESETS)}")
    if any(v <= 0 for v in (args.prose_tokens, args.wiki_tokens, args.calibration_tokens)):
        ap.error("token counts must be positive")
    setup = {"model": args.model, "prose_tokens": args.prose_tokens, "wiki_tokens": args.wiki_tokens,
             "calibration_tokens": args.calibration_tokens}
    cache_path = REPO / "runs" / "convert_quality" / "results.json"
    cache = json.loads(cache_path.read_text()) if cache_path.is_file() and not args.fresh else {}
    # (a cache written before the setup was recorded was measured with the defaults)
    cached_setup = cache.pop("setup", {"model": "smollm2", "prose_tokens": 4096, "wiki_tokens": 8192,
                                       "calibration_tokens": 8192} if cache else setup)
    if cached_setup != setup:
        ap.error(f"{cache_path} holds results measured with {cached_setup}, not {setup}; rerun with those options "
                 "or pass --fresh to start over")
    for name in redo:
        cache.pop(name, None)

    dense, tok = moeforge.load_with_tokenizer(args.model)
    corpora = {"prose": tokenize_corpus(tok, resolve_corpus("prose"), args.prose_tokens)}
    if "wikitext2" in available_benchmarks():
        corpora["wikitext2"] = tokenize_corpus(tok, resolve_corpus("wikitext2"), args.wiki_tokens)

    def measure(model) -> dict:
        return {name: evaluate_nll(model, ids, seq_len=512).perplexity for name, ids in corpora.items()}

    if "dense" not in cache:
        cache["dense"] = {"ppl": measure(dense), "params": parameter_counts(dense)}
    del dense
    for name in names:
        if name in cache:
            continue
        desc, opts = PRESETS[name]
        opts = {"experts": 8, "top_k": 2, "calibration_tokens": args.calibration_tokens, **opts}
        t0 = time.perf_counter()
        report = moeforge.convert(args.model, None, eval_tokens=0, **opts)
        seconds = time.perf_counter() - t0
        row = {
            "description": desc,
            "options": opts,
            "convert_seconds": seconds,
            "refine_seconds": sum(r.refine_seconds or 0 for r in report.layers),
            "mean_layer_error": report.mean_layer_error,
            "params": report.parameters["moe"],
            "ppl": measure(report.model),
        }
        cache[name] = row
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        cache_path.write_text(json.dumps({"setup": setup, **cache}, indent=2))
        print(name, json.dumps(row["ppl"]), f"{seconds:.0f}s", flush=True)
        del report
        gc.collect()
    text = table(cache, names, corpora, args.model)
    print(text)
    if not args.no_report:
        from moeforge.eval.report import device_description, update_section

        cmd = "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python benchmarks/convert_quality.py"
        if args.only:
            cmd += f" --only {args.only}"
        if redo:
            cmd += f" --redo {','.join(redo)}"
        missing = [n for n in PRESETS if n not in names]
        note = (f" Presets not run yet (the command without `--only` runs them): {', '.join(missing)}."
                if missing else "")
        update_section(
            "convert-quality",
            f"Perplexity of SmolLM2-135M-Instruct right after conversion (no training), `{cmd}`.\n"
            f"Device: {device_description()} (shared with other jobs; times are indicative). Calibration: "
            f"{args.calibration_tokens} tokens of the embedded prose+code train split.{note}\n\n" + text,
            title="Conversion quality before training (SmolLM2)",
        )


def table(cache: dict, names: list[str], corpora: dict, model: str) -> str:
    cols = list(corpora)
    head = ("| preset | what | active params | " + " | ".join(f"{c} ppl" for c in cols)
            + " | mean layer error | convert s | of which refine s |")
    lines = [head, "|" + "---|" * (len(cols) + 6)]
    d = cache["dense"]
    label = "SmolLM2-135M-Instruct" if model == "smollm2" else model
    lines.append(f"| dense | {label} | {d['params']['active']:,} | "
                 + " | ".join(f"{d['ppl'][c]:.2f}" for c in cols) + " | - | - | - |")
    for name in names:
        if name not in cache:
            continue
        r = cache[name]
        err = f"{r['mean_layer_error']:.3f}" if r["mean_layer_error"] is not None else "-"
        lines.append(f"| {name} | {r['description']} | {r['params']['active']:,} | "
                     + " | ".join(f"{r['ppl'].get(c, float('nan')):.1f}" for c in cols)
                     + f" | {err} | {r['convert_seconds']:.0f} | {r['refine_seconds']:.0f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
