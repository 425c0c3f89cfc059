"""Claim 3 (Zadouri et al. 2023): mixtures of lightweight experts beat their single-adapter baselines.

On SmolLM2-135M-Instruct, with the same data, steps, seed and learning rate per pair, this trains
(through ``moeforge.train``, SFT mode, a ``peft:`` section):

* (IA)^3 vs MoV-10 (mixture of 10 (IA)^3 vectors), and LoRA r=4 (about MoV-10's size);
* LoRA r=40 vs MoLoRA-10 r=4 (comparable trainable parameters), and LoRA r=4 (one MoLoRA expert);
* MoV-10 with token routing vs a frozen mean-pooled sentence embedding as router input;

on a two-task SFT mixture: GSM8K (``/work/shared/data/gsm8k`` when present) and synthetic integer
arithmetic ("What is 347 + 582?" -> "347 + 582 = 929"); without GSM8K the two tasks are
synthetic: addition/subtraction and multiplication. Each run then reports the held-out answer
loss per task and greedy exact-match accuracy, and the routed runs plot their expert usage per
task (the paper's specialisation analysis).

Run (each run is independent; runs can go in parallel processes), then write the report::

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/peft_moe.py --runs mov10,ia3
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/peft_moe.py --runs molora10,lora40
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/peft_moe.py --runs mov10-sentence,base
    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/peft_moe.py --runs lora4
    .venv/bin/python experiments/peft_moe.py --report

The default budget (24 steps x 4 packed 128-token blocks, about 12K training tokens per run) is
what a shared 2-core CPU allows; raise --steps/--seq-len/--n-loss/--n-em where there is compute.

Results land in runs/peft_moe/<run>/result.json, the table in docs/results.md (section
claim-3-peft-moe), the usage plots in docs/figures/.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moeforge.data.builtin import arithmetic_lines  # noqa: E402
from moeforge.eval.corpora import data_root  # noqa: E402

GSM8K = data_root() / "gsm8k"  # $MOEFORGE_DATA, else ../shared/data (as moeforge eval)
OUT = ROOT / "runs" / "peft_moe"
FIGURES = ROOT / "docs" / "figures"

VECTOR_LR, LORA_LR = 3e-3, 1e-3
#: run name -> (peft section or None for the untrained base model, learning rate)
RUNS: dict[str, tuple[dict | None, float]] = {
    "base": (None, 0.0),
    "ia3": ({"method": "ia3"}, VECTOR_LR),
    "mov10": ({"method": "mov", "num_experts": 10}, VECTOR_LR),
    "mov10-sentence": ({"method": "mov", "num_experts": 10, "router_input": "sentence"}, VECTOR_LR),
    "lora4": ({"method": "lora", "rank": 4, "alpha": 16}, LORA_LR),
    "lora40": ({"method": "lora", "rank": 40, "alpha": 160}, LORA_LR),
    "molora10": ({"method": "molora", "num_experts": 10, "rank": 4, "alpha": 16}, LORA_LR),
    "molora10-sentence": ({"method": "molora", "num_experts": 10, "rank": 4, "alpha": 16, "router_input": "sentence"}, LORA_LR),
}


# ------------------------------------------------------------------------------------- data
def _arith_examples(count: int, seed: int, ops: str = "+-*") -> list[dict]:
    out = []
    for line in arithmetic_lines(count * 3, seed=seed):
        lhs, result = line.split(" = ")
        if lhs.split()[1] not in ops:
            continue
        out.append({"question": f"What is {lhs}?", "answer": line, "gold": result})
        if len(out) == count:
            break
    return out


def build_tasks(out: Path, n_train_arith: int, n_loss: int, n_em: int) -> tuple[list[dict], dict[str, dict]]:
    """Trainer data sources and held-out sets {task: {"loss": [...], "em": [...]}}."""
    data_dir = out / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    tasks: dict[str, dict] = {}
    sources = []

    def write(name: str, records: list[dict]) -> Path:
        path = data_dir / f"{name}_train.jsonl"
        path.write_text("".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in records))
        return path

    common = {"prompt_field": "question", "response_field": "answer", "valid_fraction": 0.0, "pack": True, "weight": 0.5}
    if (GSM8K / "train.jsonl").is_file() and (GSM8K / "test.jsonl").is_file():
        sources.append({"name": "gsm8k", "path": str(GSM8K / "train.jsonl"), "max_tokens": 200_000, **common})
        test = [json.loads(line) for line in (GSM8K / "test.jsonl").read_text().splitlines() if line.strip()]
        for r in test:
            r["gold"] = r["answer"].rsplit("####", 1)[-1].strip().replace(",", "")
        tasks["gsm8k"] = {"loss": test[:n_loss], "em": test[:n_em]}
        train = _arith_examples(n_train_arith, seed=1)
        seen = {r["question"] for r in train}
        held = [r for r in _arith_examples(3 * n_loss, seed=2) if r["question"] not in seen]
        sources.append({"name": "arithmetic", "path": str(write("arithmetic", train)), **common})
        tasks["arithmetic"] = {"loss": held[:n_loss], "em": held[:n_em]}
    else:  # built-in synthetic tasks only
        for name, ops, seed in (("addsub", "+-", 1), ("mul", "*", 3)):
            train = _arith_examples(n_train_arith, seed=seed, ops=ops)
            seen = {r["question"] for r in train}
            held = [r for r in _arith_examples(3 * n_loss, seed=seed + 1, ops=ops) if r["question"] not in seen]
            sources.append({"name": name, "path": str(write(name, train)), **common})
            tasks[name] = {"loss": held[:n_loss], "em": held[:n_em]}
    return sources, tasks


# ---------------------------------------------------------------------------------- metrics
def _messages(r: dict, with_answer: bool = True) -> list[dict]:
    msgs = [{"role": "user", "content": r["question"]}]
    if with_answer:
        msgs.append({"role": "assistant", "content": r["answer"]})
    return msgs


@torch.no_grad()
def heldout_loss(model, tok, records: list[dict], seq_len: int, batch: int = 8) -> float:
    """Mean next-token loss on the answer tokens (the SFT loss), token-weighted."""
    from moeforge.data.chat import IGNORE_INDEX, tokenize_chat

    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    total, count = 0.0, 0
    examples = [tokenize_chat(tok, _messages(r)) for r in records]
    for i in range(0, len(examples), batch):
        chunk = [(ids[:seq_len], lab[:seq_len]) for ids, lab in examples[i : i + batch]]
        width = max(len(ids) for ids, _ in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        labels = torch.full((len(chunk), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, (a, b) in enumerate(chunk):
            ids[j, : len(a)] = torch.tensor(a)
            labels[j, : len(b)] = torch.tensor(b)
            mask[j, : len(a)] = 1
        logits = model(input_ids=ids, attention_mask=mask).logits.float()
        lp = torch.log_softmax(logits[:, :-1], -1)
        tgt = labels[:, 1:]
        keep = tgt != IGNORE_INDEX
        nll = -lp.gather(-1, tgt.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        total += float(nll[keep].sum())
        count += int(keep.sum())
    return total / max(count, 1)


def _extract(task: str, text: str) -> str | None:
    if "####" in text:
        text = text.rsplit("####", 1)[-1]
    elif " = " in text and task != "gsm8k":
        text = text.rsplit(" = ", 1)[-1]
    nums = re.findall(r"-?\d[\d,]*(?:\.\d+)?", text)
    return nums[0 if "####" in text or task != "gsm8k" else -1].replace(",", "") if nums else None


@torch.no_grad()
def exact_match(model, tok, task: str, records: list[dict], max_new_tokens: int, batch: int = 10) -> tuple[int, int]:
    """Greedy decoding from the chat prompt; the extracted final number must equal the gold answer."""
    end = tok.convert_tokens_to_ids("<|im_end|>")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    correct = 0
    for i in range(0, len(records), batch):
        chunk = records[i : i + batch]
        prompts = [tok.apply_chat_template(_messages(r, False), tokenize=False, add_generation_prompt=True) for r in chunk]
        encoded = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, e in enumerate(encoded):  # left padding for batched generation
            ids[j, width - len(e) :] = torch.tensor(e)
            mask[j, width - len(e) :] = 1
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                             eos_token_id=end, pad_token_id=pad)
        for r, seq in zip(chunk, out[:, width:]):
            text = tok.decode(seq, skip_special_tokens=True)
            pred = _extract(task, text)
            correct += int(pred is not None and pred == r["gold"])
    return correct, len(records)


# ------------------------------------------------------------------------------------- runs
def run_one(name: str, args) -> dict:
    import moeforge
    from moeforge.data.chat import ensure_chat_template
    from moeforge.eval.report import device_description

    section, lr = RUNS[name]
    out = Path(args.out)
    sources, tasks = build_tasks(out, args.arith_train, args.n_loss, args.n_em)
    run_dir = out / name
    record: dict = {"run": name, "peft": section, "lr": lr, "device": device_description(),
                    "date": datetime.date.today().isoformat(), "torch_threads": torch.get_num_threads()}
    t0 = time.time()
    if section is None:
        model, tok = moeforge.load_with_tokenizer("smollm2")
        ensure_chat_template(tok, "chatml")
        record.update(trainable=0, percent=0.0, steps=0, train_tokens=0, train_wall_s=0.0)
    else:
        from moeforge.train import train

        config = {
            "model": "smollm2",
            "output_dir": str(run_dir / "train"),
            "data": sources,
            "steps": args.steps,
            "batch_size": args.batch_size,
            "seq_len": args.seq_len,
            "lr": lr,
            "warmup_steps": max(1, args.steps // 10),
            "min_lr_ratio": 0.1,
            "weight_decay": 0.0,
            "save_every": args.steps,
            "keep_last": 1,
            "log_every": 5,
            "eval_every": 0,
            "seed": args.seed,
            "overwrite": True,
            "progress": False,
            "plots": False,
            "chat_template": "chatml",
            "peft": section,
        }
        result = train(config)
        model = result.model
        tok = moeforge.load_tokenizer("smollm2")
        ensure_chat_template(tok, "chatml")
        summary = model.parameter_summary()
        record.update(trainable=summary.trainable, percent=summary.percent, steps=result.steps,
                      train_tokens=result.tokens, train_wall_s=result.wall_time_s, final_train_loss=result.final_loss)
    model.eval()
    t1 = time.time()
    routed = section is not None and section["method"] in ("mov", "molora")
    losses, usage = {}, {}
    for task, sets in tasks.items():
        if routed:
            with model.record_routing() as rec:
                losses[task] = heldout_loss(model, tok, sets["loss"], args.seq_len)
            usage[task] = rec.mean_probs()
        else:
            losses[task] = heldout_loss(model, tok, sets["loss"], args.seq_len)
    record["heldout_loss"] = losses
    record["exact_match"] = {
        task: exact_match(model, tok, task, sets["em"], args.gsm8k_new_tokens if task == "gsm8k" else 16)
        for task, sets in tasks.items()
    }
    record["eval_wall_s"] = time.time() - t1
    if routed:
        record.update(_usage_outputs(name, usage, run_dir))
    record["wall_s"] = time.time() - t0
    record["config"] = {k: getattr(args, k) for k in ("steps", "batch_size", "seq_len", "seed", "arith_train", "n_loss", "n_em")}
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def _usage_outputs(name: str, usage: dict, run_dir: Path) -> dict:
    """Save the per-task expert usage (usage.json), plot it, and condense it into one number."""
    from moeforge.peft import plot_expert_usage, specialisation

    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "usage.json").write_text(json.dumps({t: {m: v.tolist() for m, v in u.items()} for t, u in usage.items()}))
    figure = plot_expert_usage(usage, FIGURES / f"peft-moe-usage-{name}.png",
                               title=f"{name}: mean router weight per expert, by task (held-out)")
    return {"specialisation_js_bits": specialisation(usage), "usage_plot": str(figure.relative_to(ROOT))}


def replot(name: str, args) -> dict:
    """Reload a finished routed run's saved adapter onto a fresh SmolLM2, recompute its held-out
    loss (a check of save/load on the real model) and its expert usage, and redraw the plot."""
    import moeforge
    from moeforge.data.chat import ensure_chat_template
    from moeforge.peft import load_adapter

    run_dir = Path(args.out) / name
    record = json.loads((run_dir / "result.json").read_text())
    cfg = record["config"]
    _, tasks = build_tasks(Path(args.out), cfg["arith_train"], cfg["n_loss"], cfg["n_em"])
    model = load_adapter(moeforge.load("smollm2"), run_dir / "train" / "final")
    model.eval()
    tok = moeforge.load_tokenizer("smollm2")
    ensure_chat_template(tok, "chatml")
    usage, losses = {}, {}
    for task, sets in tasks.items():
        with model.record_routing() as rec:
            losses[task] = heldout_loss(model, tok, sets["loss"], cfg["seq_len"])
        usage[task] = rec.mean_probs()
    record["reloaded_heldout_loss"] = losses
    record.update(_usage_outputs(name, usage, run_dir))
    (run_dir / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


def init_usage(name: str, args) -> dict:
    """Specialisation of the *untrained* routers (seeded as the trainer seeds them): the baseline
    against which a trained run's task-dependent expert usage is read."""
    import moeforge
    from moeforge.data.chat import ensure_chat_template
    from moeforge.peft import specialisation, wrap_from_config

    run_dir = Path(args.out) / name
    record = json.loads((run_dir / "result.json").read_text())
    cfg = record["config"]
    _, tasks = build_tasks(Path(args.out), cfg["arith_train"], cfg["n_loss"], cfg["n_em"])
    torch.manual_seed(cfg["seed"])
    model = wrap_from_config(moeforge.load("smollm2"), record["peft"])
    model.eval()
    tok = moeforge.load_tokenizer("smollm2")
    ensure_chat_template(tok, "chatml")
    usage = {}
    for task, sets in tasks.items():
        with model.record_routing() as rec:
            heldout_loss(model, tok, sets["loss"], cfg["seq_len"])
        usage[task] = rec.mean_probs()
    record["init_specialisation_js_bits"] = specialisation(usage)
    (run_dir / "result.json").write_text(json.dumps(record, indent=2) + "\n")
    return record


# ----------------------------------------------------------------------------------- report
def _fmt_params(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}K"


def report(args) -> str:
    from moeforge.eval.report import update_section

    out = Path(args.out)
    results = {}
    for name in RUNS:
        path = out / name / "result.json"
        if path.is_file():
            results[name] = json.loads(path.read_text())
    if not results:
        raise SystemExit(f"no results under {out}; run some --runs first")
    tasks = list(next(iter(results.values()))["heldout_loss"])
    head = "| run | method | trainable | % of base | lr | " + " | ".join(
        f"{t} loss | {t} EM" for t in tasks) + " | JS spec. (init) | train tokens | train wall |"
    lines = [head, "|" + "---|" * (6 + 2 * len(tasks) + 2)]
    for name, r in results.items():
        method = "none (zero-shot)" if r["peft"] is None else ", ".join(f"{k}={v}" for k, v in r["peft"].items())
        cells = [name, method, _fmt_params(r["trainable"]) if r["trainable"] else "0", f"{r['percent']:.2f}",
                 f"{r['lr']:g}" if r["lr"] else "-"]
        for t in tasks:
            c, n = r["exact_match"][t]
            cells += [f"{r['heldout_loss'][t]:.3f}", f"{c}/{n}"]
        spec, init = r.get("specialisation_js_bits"), r.get("init_specialisation_js_bits")
        spec_cell = "-" if spec is None else f"{spec:.4f}" + ("" if init is None else f" ({init:.4f})")
        cells += [spec_cell, f"{r['train_tokens']:,}", f"{r['train_wall_s'] / 60:.1f} min"]
        lines.append("| " + " | ".join(cells) + " |")

    def delta(a: str, b: str) -> str | None:
        if a not in results or b not in results:
            return None
        parts = []
        for t in tasks:
            la, lb = results[a]["heldout_loss"][t], results[b]["heldout_loss"][t]
            ca, cb = results[a]["exact_match"][t][0], results[b]["exact_match"][t][0]
            n = results[a]["exact_match"][t][1]
            parts.append(f"{t} loss {la:.3f} vs {lb:.3f} ({100 * (la - lb) / lb:+.1f}%), EM {ca}/{n} vs {cb}/{n}")
        return f"- **{a} vs {b}**: " + "; ".join(parts) + "."

    pairs = [("mov10", "ia3"), ("mov10", "lora4"), ("molora10", "lora40"), ("molora10", "lora4"),
             ("mov10", "mov10-sentence"), ("molora10", "molora10-sentence"), ("ia3", "base"), ("lora40", "base")]
    comparisons = [line for line in (delta(a, b) for a, b in pairs) if line]
    any_r = next(r for r in results.values() if r["steps"])
    cfg = any_r["config"]
    counts = sorted({r.get("torch_threads") for r in results.values() if r.get("torch_threads")})
    threads = ("one thread" if counts == [1] else f"{'/'.join(map(str, counts))} threads") if counts else "threads unrecorded"
    body = [
        "Claim (Zadouri et al. 2023): a mixture of lightweight experts (MoV, MoLoRA) beats the single adapter it "
        "is made of ((IA)³, LoRA), at a fraction of a percent of trainable parameters.",
        "",
        f"Setup: SmolLM2-135M-Instruct frozen; SFT through `moeforge.train` (ChatML, loss on answers only, packed "
        f"{cfg['seq_len']}-token blocks) on a 50/50 mixture of {' and '.join(tasks)}; {cfg['steps']} steps x "
        f"{cfg['batch_size']} blocks, seed {cfg['seed']}, AdamW (weight decay 0), warmup 10% then cosine to 0.1x; "
        f"lr {VECTOR_LR:g} for the vector methods, {LORA_LR:g} for the LoRA methods (the same lr within each family; "
        "mov10 vs lora4 crosses families). Sentence routing's prefix mean spans a packed training block, "
        "not one example (held-out examples run one per row). "
        f"Held-out: answer-token loss on {cfg['n_loss']} test examples per task; exact match (greedy, final number) "
        f"on {cfg['n_em']} per task. JS spec.: mean Jensen-Shannon divergence (bits) between the tasks' expert-usage "
        "distributions over all routed modules (0 = both tasks use the experts alike); in brackets the same for the "
        "untrained routers (same seed), since random routers already route different inputs differently.",
        "",
        *lines,
        "",
        "Comparisons (held-out answer loss of the first run vs the second; a negative % favours the first):",
        *comparisons,
        "",
        "Expert usage per task: " + ", ".join(f"[{n}]({Path(r['usage_plot']).relative_to('docs')})"
                                            for n, r in results.items() if r.get("usage_plot")) + ".",
        "",
        f"Device: {any_r['device']}, {threads} per run, shared with other jobs. "
        f"Date: {any_r['date']}.",
        "",
        "Command:",
        "```",
        f"# processes side by side (each with --steps {cfg['steps']} --batch-size {cfg['batch_size']} "
        f"--seq-len {cfg['seq_len']} --n-loss {cfg['n_loss']} --n-em {cfg['n_em']})",
        "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/peft_moe.py --runs mov10,ia3",
        "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/peft_moe.py --runs molora10,lora40",
        "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/peft_moe.py --runs mov10-sentence,base",
        "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/peft_moe.py --runs lora4",
        "# the bracketed (init) values of the JS column: the same routers untrained",
        ".venv/bin/python experiments/peft_moe.py --init-usage mov10,mov10-sentence,molora10",
        ".venv/bin/python experiments/peft_moe.py --report --verdict experiments/peft_moe_verdict.md",
        "```",
    ]
    if args.verdict:
        body += ["", "Verdict: " + Path(args.verdict).read_text().strip()]
    markdown = "\n".join(body)
    kwargs = {"path": args.results_md} if args.results_md else {}
    update_section("claim-3-peft-moe", markdown, title="Claim 3: PEFT-MoE",
                   **kwargs)
    return markdown


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="", help=f"comma-separated runs: {', '.join(RUNS)}")
    parser.add_argument("--report", action="store_true", help="write the docs/results.md section from finished runs")
    parser.add_argument("--replot", default="", help="comma-separated finished routed runs to reload and replot")
    parser.add_argument("--init-usage", default="", help="comma-separated finished routed runs: JS spec. of untrained routers")
    parser.add_argument("--verdict", default=None,
                        help="a text file appended as the verdict (the judgement written for the committed numbers: experiments/peft_moe_verdict.md)")
    parser.add_argument("--out", default=str(OUT))
    parser.add_argument("--results-md", default=None, help="report file (default docs/results.md)")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--arith-train", type=int, default=4000, help="synthetic arithmetic training examples")
    parser.add_argument("--n-loss", type=int, default=24, help="held-out examples per task for the loss")
    parser.add_argument("--n-em", type=int, default=10, help="held-out examples per task for exact match")
    parser.add_argument("--gsm8k-new-tokens", type=int, default=128)
    args = parser.parse_args(argv)
    for name in [n for n in args.runs.split(",") if n]:
        if name not in RUNS:
            raise SystemExit(f"unknown run {name!r}; choose from {', '.join(RUNS)}")
        t = time.time()
        r = run_one(name, args)
        print(json.dumps({k: r[k] for k in ("run", "trainable", "percent", "heldout_loss", "exact_match")}),
              f"({(time.time() - t) / 60:.1f} min)", flush=True)
    for name in [n for n in args.replot.split(",") if n]:
        r = replot(name, args)
        print(json.dumps({"run": name, "heldout_loss": r["heldout_loss"], "reloaded": r["reloaded_heldout_loss"]}), flush=True)
    for name in [n for n in args.init_usage.split(",") if n]:
        r = init_usage(name, args)
        print(json.dumps({"run": name, "init_js": r["init_specialisation_js_bits"], "trained_js": r["specialisation_js_bits"]}),
              flush=True)
    if args.report:
        print(report(args))


if __name__ == "__main__":
    main()
