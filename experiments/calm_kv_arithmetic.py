"""CALM key-value arithmetic (Bansal et al. 2024, Table 1), scaled to a 2-core CPU.

Run (about an hour on one core of the 2-core reference machine):

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/calm_kv_arithmetic.py

Stages (each model is saved under --out and reused by later runs with --reuse):

1. m_A (augmenting): a small LLaMA trained from scratch to memorise key -> value pairs
   (single-key lookups plus KV-Substitution ``abc+de:`` -> ``12+34``), all keys.
2. m_B (anchor): a small LLaMA of a different width and depth trained from scratch on
   Numeric-Arithmetic (``12+34-5=`` -> ``41``). Both use the same character tokenizer.
3. The composition m_B <- m_A, trained by ``moeforge train configs/calm_kv.yaml`` (its
   ``compose:`` section; paths overridden to --out) on KV-Arithmetic (``abc+de-f=`` -> ``41``)
   over 20% of the keys; m_A and m_B frozen.
4. Greedy exact-match accuracy of m_A, m_B and the composition on KV-Substitution,
   Numeric-Arithmetic and KV-Arithmetic, KV-Arithmetic on held-out keys only.

The table goes into docs/results.md (section claim-4-calm) unless --no-report.
The paper derives both models from PaLM2; smollm2 (135M) trains at ~100 tokens/s here, too
slow to memorise thousands of pairs, so both models are trained here from scratch.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import torch

from moeforge.compose.kv_task import KVTable, char_tokenizer, numeric_sample

PAPER = {  # Table 1 of Bansal et al. 2024, accuracy (%)
    "kv_substitution": {"m_A": 98.1, "m_B": 0.0, "CALM": 92.9},
    "numeric_arithmetic": {"m_A": 4.2, "m_B": 73.7, "CALM": 72.0},
    "kv_arithmetic": {"m_A": 0.7, "m_B": 0.0, "CALM": 84.3},
}
TASK_TITLES = {"kv_substitution": "KV-Substitution", "numeric_arithmetic": "Numeric-Arithmetic",
               "kv_arithmetic": "KV-Arithmetic"}


# --------------------------------------------------------------------------------------- data
def encode_batch(tok, examples: list[tuple[str, str]], device="cpu"):
    """Right-padded training batch: <s> prompt target </s>, loss on target and </s> only."""
    ids, labels = [], []
    for prompt, target in examples:
        p = tok(prompt)["input_ids"]  # <s> + prompt chars
        t = tok(target, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        ids.append(p + t)
        labels.append([-100] * len(p) + t)
    width = max(len(x) for x in ids)
    input_ids = torch.full((len(ids), width), tok.pad_token_id, dtype=torch.long)
    label_t = torch.full((len(ids), width), -100, dtype=torch.long)
    mask = torch.zeros((len(ids), width), dtype=torch.long)
    for i, (x, y) in enumerate(zip(ids, labels)):
        input_ids[i, : len(x)] = torch.tensor(x)
        label_t[i, : len(y)] = torch.tensor(y)
        mask[i, : len(x)] = 1
    return input_ids.to(device), mask.to(device), label_t.to(device)


# ----------------------------------------------------------------------------------- training
def lr_at(step: int, total: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train_loop(model, params, batches, *, steps: int, lr: float, warmup: int, log_every: int, name: str,
               weight_decay: float = 0.0) -> dict:
    """AdamW with warmup + cosine to 0.1x; returns tokens seen, wall time and the last losses."""
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    model.train()
    tokens, start, recent = 0, time.time(), []
    for step in range(steps):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, steps, lr, warmup)
        input_ids, mask, labels = next(batches)
        loss = model(input_ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        tokens += int(mask.sum())
        recent.append(loss.item())
        if (step + 1) % log_every == 0 or step == steps - 1:
            print(f"[{name}] step {step + 1}/{steps} loss {sum(recent) / len(recent):.4f} "
                  f"({time.time() - start:.0f}s)", flush=True)
            recent = []
    model.eval()
    return {"steps": steps, "tokens": tokens, "wall_s": round(time.time() - start, 1)}


def stream(make_examples, tok, batch_size: int, seed: int):
    """Endless batches; ``make_examples(rng, n)`` draws n fresh (prompt, target) pairs."""
    rng = random.Random(seed)
    while True:
        yield encode_batch(tok, make_examples(rng, batch_size))


def new_llama(tok, hidden: int, layers: int, heads: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=4 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=64,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    return LlamaForCausalLM(cfg)


# --------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def accuracy(model, tok, examples: list[tuple[str, str]], batch_size: int = 256) -> float:
    """Greedy exact match of the text generated after the prompt (stopped at </s>)."""
    correct = 0
    for i in range(0, len(examples), batch_size):
        chunk = examples[i : i + batch_size]
        enc = tok([p for p, _ in chunk], return_tensors="pt", padding=True)
        new = max(len(t) for _, t in chunk) + 1
        kwargs = dict(max_new_tokens=new, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        out = model.generate(enc["input_ids"], attention_mask=enc["attention_mask"], **kwargs)
        for row, (_, target) in zip(out[:, enc["input_ids"].shape[1]:], chunk):
            text = tok.decode(row, skip_special_tokens=True)
            correct += text == target
    return 100.0 * correct / len(examples)


# ------------------------------------------------------------------------------------- stages
def train_source_model(role: str, directory: Path, tok, make_examples, args, hidden, layers, heads, steps, lr, data):
    """Train (or, with --reuse, reopen) one source model; ``data`` describes its task for the reuse check."""
    from transformers import AutoModelForCausalLM

    spec = {"hidden": hidden, "layers": layers, "heads": heads, "steps": steps, "lr": lr, "batch_size": args.batch_size,
            "seed": args.seed, "data": data}
    stats_file = directory / "train_stats.json"
    if args.reuse and stats_file.is_file():
        stats = json.loads(stats_file.read_text())
        if stats.get("spec") == spec:
            print(f"[{role}] reusing {directory}", flush=True)
            tok.save_pretrained(directory)  # the current tokenizer (with its chat template) beside the model
            return AutoModelForCausalLM.from_pretrained(directory).eval(), stats
        print(f"[{role}] not reusing {directory}: trained with {stats.get('spec')}, this run asks {spec}", flush=True)
    torch.manual_seed(args.seed)
    model = new_llama(tok, hidden, layers, heads)
    stats = train_loop(model, list(model.parameters()), stream(make_examples, tok, args.batch_size, args.seed + 1),
                       steps=steps, lr=lr, warmup=min(200, steps // 10), log_every=args.log_every, name=role,
                       weight_decay=0.01)
    stats["parameters"] = sum(p.numel() for p in model.parameters())
    stats["shape"] = {"hidden": hidden, "layers": layers, "heads": heads}
    stats["spec"] = spec
    from moeforge.utils.io import atomic_output_dir

    with atomic_output_dir(directory, overwrite=True) as tmp:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "train_stats.json").write_text(json.dumps(stats) + "\n")
    return model, stats


def train_composition(args, out: Path, table: KVTable):
    """Stage 3 through the trainer: ``moeforge train configs/calm_kv.yaml`` with this run's paths."""
    from moeforge.train.trainer import train

    data = out / "data" / "kv_arithmetic_train.jsonl"
    data.parent.mkdir(parents=True, exist_ok=True)
    examples = table.sample("kv_arithmetic", args.train_examples, keys=table.train_keys, seed=args.seed + 2)
    data.write_text("".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in examples))
    overrides = {
        "model": str(out / "m_B"),
        "output_dir": str(out / "composition_run"),
        "data.kv_arithmetic.path": str(data),
        "compose.augmenting": str(out / "m_A"),
        "overwrite": True,
        "progress": False,
        "plots": False,
        "seed": args.seed,
    }
    for key, value in (("steps", args.steps_c), ("lr", args.lr_c), ("batch_size", args.batch_size),
                       ("compose.num_connections", args.num_connections)):
        if value is not None:
            overrides[key] = value
    torch.manual_seed(args.seed)
    result = train(args.config, overrides=overrides)
    composed = result.model.eval()
    print(f"[CALM] layer pairs (m_A, m_B): {composed.layer_pairs}, "
          f"{composed.num_composition_parameters():,} trainable parameters, final loss {result.final_loss:.4f}",
          flush=True)
    stats = {"steps": result.steps, "tokens": result.tokens, "wall_s": round(result.wall_time_s, 1),
             "parameters": composed.num_composition_parameters(), "final_loss": result.final_loss,
             "train_examples": len(examples), "final_dir": str(result.final_dir)}
    return composed, stats


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/calm_kv", help="Where the models and the composition are written.")
    ap.add_argument("--num-keys", type=int, default=200)
    ap.add_argument("--max-value", type=int, default=99)
    ap.add_argument("--max-terms", type=int, default=3)
    ap.add_argument("--composition-fraction", type=float, default=0.2)
    ap.add_argument("--spaced", action="store_true", help="Single spaces between tokens: `abc + de =`.")
    ap.add_argument("--space-jitter", type=int, default=0,
                    help="m_B trains on 0..N spaces before every token (evaluation uses single spaces).")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--steps-a", type=int, default=1500, help="m_A (memoriser) training steps.")
    ap.add_argument("--steps-b", type=int, default=8000, help="m_B (arithmetic) training steps.")
    ap.add_argument("--config", default="configs/calm_kv.yaml", help="Trainer config of the composition stage.")
    ap.add_argument("--steps-c", type=int, default=None, help="Composition training steps (default: the config's).")
    ap.add_argument("--lr", type=float, default=2e-3, help="Learning rate of m_A and m_B.")
    ap.add_argument("--lr-c", type=float, default=None, help="Composition learning rate (default: the config's).")
    ap.add_argument("--train-examples", type=int, default=50_000,
                    help="KV-Arithmetic training expressions (over the composition keys) written for the trainer.")
    ap.add_argument("--hidden-a", type=int, default=96)
    ap.add_argument("--layers-a", type=int, default=4)
    ap.add_argument("--hidden-b", type=int, default=128)
    ap.add_argument("--layers-b", type=int, default=4)
    ap.add_argument("--num-connections", type=int, default=None, help="Default: the config's.")
    ap.add_argument("--eval-size", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--log-every", type=int, default=100)
    ap.add_argument("--reuse", action="store_true", help="Reuse m_A / m_B already trained under --out.")
    ap.add_argument("--no-report", action="store_true", help="Do not write docs/results.md.")
    ap.add_argument("--report", default=None, help="Report file (default docs/results.md).")
    ap.add_argument("--report-only", action="store_true",
                    help="Rewrite the report from --out/results.json of an earlier run, without training.")
    ap.add_argument("--also", action="append", default=[], metavar="RUN_DIR",
                    help="Add another run's results.json (e.g. a setting that failed) to the report; repeatable.")
    args = ap.parse_args(argv)

    def extras():
        out = []
        for run in args.also:
            other = json.loads((Path(run) / "results.json").read_text())
            out.append((other, other.get("argv") or _argv_from(other["args"], ap)))
        return out

    if args.report_only and not (Path(args.out) / "results.json").is_file():
        ap.error(f"--report-only: {Path(args.out) / 'results.json'} does not exist; run the experiment first")
    connections = args.num_connections
    if connections is None and Path(args.config).is_file():
        import yaml

        connections = ((yaml.safe_load(Path(args.config).read_text()) or {}).get("compose") or {}).get("num_connections")
    if not args.report_only and connections is not None and connections > min(args.layers_a, args.layers_b):
        # checked here, before m_A and m_B are trained, not when they are composed
        ap.error(f"{connections} connections need at least {connections} layers in both models "
                 f"(--layers-a {args.layers_a}, --layers-b {args.layers_b})")
    if args.report_only:
        summary = json.loads((Path(args.out) / "results.json").read_text())
        write_report(summary, summary.get("argv") or _argv_from(summary["args"], ap), args.report, extras())
        return 0
    torch.set_num_threads(max(1, torch.get_num_threads()))
    started = time.time()
    out = Path(args.out)
    tok = char_tokenizer()
    table = KVTable.generate(args.num_keys, max_value=args.max_value, composition_fraction=args.composition_fraction,
                             max_terms=args.max_terms, seed=args.seed, spaced=args.spaced)
    all_keys = list(table.values)
    lookups = table.lookups()

    def memorise(rng, n):  # m_A: half single-key lookups, half 2..max_terms-key substitutions
        half = n // 2
        ex = [rng.choice(lookups) for _ in range(half)]
        ex += table.sample("kv_substitution", n - half, seed=rng.randrange(1 << 30))
        return ex

    def arithmetic(rng, n):  # m_B: numbers only
        return numeric_sample(n, max_value=args.max_value, max_terms=args.max_terms, seed=rng.randrange(1 << 30),
                              spaced=args.spaced, space_jitter=args.space_jitter)

    m_a, stats_a = train_source_model("m_A", out / "m_A", tok, memorise, args, args.hidden_a, args.layers_a,
                                      max(1, args.hidden_a // 32), args.steps_a, args.lr,
                                      {"task": "kv_substitution+lookups", "num_keys": args.num_keys,
                                       "spaced": args.spaced,
                                       "max_value": args.max_value, "max_terms": args.max_terms})
    print(f"[m_A] KV-Substitution accuracy (200 expressions): "
          f"{accuracy(m_a, tok, table.sample('kv_substitution', 200, seed=99)):.1f}%", flush=True)
    m_b, stats_b = train_source_model("m_B", out / "m_B", tok, arithmetic, args, args.hidden_b, args.layers_b,
                                      max(1, args.hidden_b // 32), args.steps_b, args.lr,
                                      {"task": "numeric_arithmetic", "max_value": args.max_value,
                                       "spaced": args.spaced, "space_jitter": args.space_jitter,
                                       "max_terms": args.max_terms})
    print(f"[m_B] Numeric-Arithmetic accuracy (200 expressions): "
          f"{accuracy(m_b, tok, numeric_sample(200, max_value=args.max_value, seed=99, spaced=args.spaced)):.1f}%", flush=True)

    composed, stats_c = train_composition(args, out, table)

    evals = {
        "kv_substitution": table.sample("kv_substitution", args.eval_size, seed=10_001),
        "numeric_arithmetic": numeric_sample(args.eval_size, max_value=args.max_value, max_terms=args.max_terms,
                                             spaced=args.spaced,
                                             seed=10_002),
        "kv_arithmetic": table.sample("kv_arithmetic", args.eval_size, keys=table.heldout_keys, seed=10_003),
        "kv_arithmetic_train_keys": table.sample("kv_arithmetic", args.eval_size, keys=table.train_keys, seed=10_004),
    }
    composed = composed.eval()
    models = {"m_A": m_a, "m_B": m_b, "CALM": composed}
    results = {task: {name: accuracy(m, tok, ex) for name, m in models.items()} for task, ex in evals.items()}
    wall = time.time() - started
    summary = {"results": results, "stats": {"m_A": stats_a, "m_B": stats_b, "CALM": stats_c},
               "args": vars(args), "wall_s": round(wall, 1), "keys": {"total": len(all_keys),
               "composition": len(table.train_keys), "heldout": len(table.heldout_keys)},
               "layer_pairs": composed.layer_pairs, "argv": argv if argv is not None else sys.argv[1:],
               "date": time.strftime("%Y-%m-%d")}
    (out / "results.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(json.dumps(results, indent=2))
    if not args.no_report:
        write_report(summary, argv if argv is not None else sys.argv[1:], args.report, extras())
    return 0


def _argv_from(recorded: dict, parser: argparse.ArgumentParser) -> list[str]:
    """The command-line flags that differ from the defaults, rebuilt from a run's recorded args."""
    argv = []
    for action in parser._actions:
        name = action.dest
        if name in ("help", "no_report", "report", "report_only") or name not in recorded:
            continue
        value = recorded[name]
        if value == action.default:
            continue
        flag = action.option_strings[0]
        argv += [flag] if isinstance(action, argparse._StoreTrueAction) else [flag, str(value)]
    return argv


def _command(argv: list[str]) -> str:
    return "OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python experiments/calm_kv_arithmetic.py" + (
        " " + " ".join(argv) if argv else "")


def _other_runs(extras: list[tuple[dict, list[str]]]) -> list[str]:
    """A table of other settings' key numbers (each from its own results.json)."""
    if not extras:
        return []
    rows = ["", "Other settings run with the same script (accuracy %, same evaluation):", "",
            "| values | keys (composition) | m_B Numeric-Arithmetic | KV-Arithmetic m_A / m_B / CALM | "
            "CALM on composition keys | CALM Numeric-Arithmetic | budget (m_A / m_B / composition steps) | command |",
            "|---|---|---|---|---|---|---|---|"]
    for other, argv in extras:
        r, a, k, st = other["results"], other["args"], other["keys"], other["stats"]
        kv = r["kv_arithmetic"]
        rows.append(
            f"| 1..{a['max_value']} | {k['total']} ({k['composition']}) | {r['numeric_arithmetic']['m_B']:.1f} | "
            f"{kv['m_A']:.1f} / {kv['m_B']:.1f} / {kv['CALM']:.1f} | {r['kv_arithmetic_train_keys']['CALM']:.1f} | "
            f"{r['numeric_arithmetic']['CALM']:.1f} | {st['m_A']['steps']} / {st['m_B']['steps']} / {st['CALM']['steps']} | "
            f"`{_command(argv)}` |")
    if any("--reuse" in argv for _, argv in extras):
        rows += ["", "`--reuse` in a command means m_A/m_B came from an earlier run under the same `--out`; the budget "
                 "column gives the steps they were actually trained for."]
    return rows


def verdicts(r: dict) -> list[str]:
    """The claim's parts checked against this run's accuracies (a list of markdown bullets)."""
    kv, num, seen = r["kv_arithmetic"], r["numeric_arithmetic"], r["kv_arithmetic_train_keys"]
    best_part = max(kv["m_A"], kv["m_B"])
    out = []
    if kv["CALM"] > best_part:
        out.append(f"* **Composition beats both parts on KV-Arithmetic (held-out keys)**: CALM {kv['CALM']:.1f}% vs "
                   f"m_A {kv['m_A']:.1f}% and m_B {kv['m_B']:.1f}% (paper: 84.3 vs 0.7 / 0.0).")
    else:
        out.append(f"* **Composition does not beat its parts on KV-Arithmetic (held-out keys)**: CALM {kv['CALM']:.1f}% vs "
                   f"m_A {kv['m_A']:.1f}% and m_B {kv['m_B']:.1f}% (paper: 84.3 vs 0.7 / 0.0).")
    if kv["CALM"] < 0.5 * PAPER["kv_arithmetic"]["CALM"]:
        out.append(f"* The level is far below the paper's ({kv['CALM']:.1f}% vs 84.3%): the claim holds in direction only "
                   "at this scale.")
    gap = seen["CALM"] - kv["CALM"]
    if gap > 10:
        out.append(f"* On the keys seen in composition training CALM reaches {seen['CALM']:.1f}% against {kv['CALM']:.1f}% "
                   "on held-out keys: much of what the connections learned is those keys' values themselves, not a "
                   "general way of reading values out of m_A.")
    kept = num["CALM"] / num["m_B"] if num["m_B"] else 0.0
    paper_kept = PAPER["numeric_arithmetic"]["CALM"] / PAPER["numeric_arithmetic"]["m_B"]
    word = "keeps" if kept >= 0.9 else "loses most of" if kept < 0.5 else "loses part of"
    out.append(f"* The composed model {word} the anchor's own skill: Numeric-Arithmetic {num['CALM']:.1f}% vs m_B's "
               f"{num['m_B']:.1f}% (paper: {PAPER['numeric_arithmetic']['CALM']} of {PAPER['numeric_arithmetic']['m_B']}, "
               f"{paper_kept:.0%} kept; here {kept:.0%}). The composition is trained on KV-Arithmetic prompts only, so its "
               "connections are never shown plain numbers.")
    out.append(f"* KV-Substitution (m_A's task): CALM {r['kv_substitution']['CALM']:.1f}% vs the paper's 92.9%; our "
               "composition is trained on KV-Arithmetic prompts only.")
    out.append("* One seed and one scaled-down configuration: these are indications, not significance-tested results.")
    return out


def write_report(summary: dict, argv: list[str], path: str | None = None,
                 extras: list[tuple[dict, list[str]]] = ()) -> None:
    from moeforge.eval.report import DEFAULT_REPORT, device_description, update_section

    r, s, a = summary["results"], summary["stats"], summary["args"]
    rows = ["| task | m_A (ours) | m_B (ours) | CALM (ours) | m_A (paper) | m_B (paper) | CALM (paper) |",
            "|---|---|---|---|---|---|---|"]
    for task in ("kv_substitution", "numeric_arithmetic", "kv_arithmetic"):
        o, p = r[task], PAPER[task]
        rows.append(f"| {TASK_TITLES[task]} | {o['m_A']:.1f} | {o['m_B']:.1f} | {o['CALM']:.1f} | "
                    f"{p['m_A']} | {p['m_B']} | {p['CALM']} |")
    t = r["kv_arithmetic_train_keys"]
    rows.append(f"| KV-Arithmetic, composition-training keys | {t['m_A']:.1f} | {t['m_B']:.1f} | {t['CALM']:.1f} | – | – | – |")
    cmd = _command(argv)
    reuse_note = (" (`--reuse` took m_A/m_B from an earlier run of the same command under `--out`; their training "
                  "budget below is that run's)") if "--reuse" in argv else ""
    k = summary["keys"]
    md = "\n".join([
        "Accuracy (%, greedy exact match, " + f"{a['eval_size']} expressions per task). KV-Arithmetic is evaluated on "
        f"expressions over held-out keys only: the composition was trained on {k['composition']} of {k['total']} keys "
        f"({a['composition_fraction']:.0%}) and tested on the other {k['heldout']}.",
        "",
        *rows,
        "",
        f"- Models: m_A (augmenting, memorises {k['total']} key→value pairs, values 1..{a['max_value']}) is a LLaMA "
        f"of hidden {s['m_A']['shape']['hidden']}, {s['m_A']['shape']['layers']} layers ({s['m_A']['parameters']:,} "
        f"parameters); m_B (anchor, arithmetic on 2..{a['max_terms']} numbers with + and −) a LLaMA of hidden "
        f"{s['m_B']['shape']['hidden']}, {s['m_B']['shape']['layers']} layers ({s['m_B']['parameters']:,} parameters). "
        "Both are trained here from scratch and share a character-level tokenizer "
        "(`moeforge.compose.kv_task.char_tokenizer`); the paper uses PaLM2 models, and deriving both from smollm2 "
        "is beyond this CPU's budget (~100 training tokens/s).",
        f"- Composition (trained with `moeforge train {a['config']}`): {len(summary['layer_pairs'])} connections, layer pairs (m_A, m_B) {summary['layer_pairs']}, "
        f"{s['CALM']['parameters']:,} trainable parameters; both models frozen.",
        f"- Budget: m_A {s['m_A']['steps']} steps / {s['m_A']['tokens']:,} tokens / {s['m_A']['wall_s']:.0f} s; "
        f"m_B {s['m_B']['steps']} steps / {s['m_B']['tokens']:,} tokens / {s['m_B']['wall_s']:.0f} s; "
        f"composition {s['CALM']['steps']} steps / {s['CALM']['tokens']:,} tokens / {s['CALM']['wall_s']:.0f} s "
        f"on {s['CALM']['train_examples']:,} expressions (batch {a['batch_size']}); this invocation of the script (evaluation included) {summary['wall_s'] / 60:.0f} min.",
        "- Scaled-down task: the paper uses 25K pairs, keys of 2–6 characters, values up to 25K and expressions of "
        "3–6 keys with +, −, ×; here keys have 2–4 letters and expressions 2–"
        f"{a['max_terms']} keys with + and −. Prompts: `abc+de:` (substitution), `12+34=` (arithmetic), `abc+de=` (KV-arithmetic)"
        + (f"; m_B's training prompts carry 0..{a['space_jitter']} random spaces before each token, so the anchor does not tie "
           "its arithmetic to fixed positions (evaluation prompts have none)." if a.get("space_jitter") else "."),
        f"- Device: {device_description()}, one thread (`OMP_NUM_THREADS=1`), shared with other jobs.",
        f"- Command: `{cmd}`{reuse_note}; `--report-only` rewrites this section from `results.json`.",
        *_other_runs(list(extras)),
        "",
        "What holds here:",
        "",
        *verdicts(r),
    ])
    update_section("claim-4-calm", md, path=path or DEFAULT_REPORT,
                   title="CALM: key-value arithmetic (Bansal et al. 2024, Table 1)")


if __name__ == "__main__":
    raise SystemExit(main())
