"""Task accuracy of SmolLM2 and the MoE models the other experiments build (``moeforge eval --task``).

Perplexity is what the other sections measure; this one asks what the models get right, on the
built-in arithmetic tasks (problems that no document of the arithmetic training domain holds):

* ``arithmetic``: greedy generation after 3 solved examples, exact match of the number;
* ``arithmetic-choice``: the same problems with 4 options (the result and three near misses),
  scored by log-likelihood after 3 solved examples (25% is chance).

Models, each where it exists (build them with the scripts named):

* SmolLM2 (dense): ``smollm2``;
* its arithmetic fine-tune and the 3-expert top-1 merge of SmolLM2 with its code and arithmetic
  fine-tunes: ``experiments/merge_domains.py`` (``runs/merge_domains``);
* SmolLM2 split into 8 experts top-2, before training: ``moeforge convert smollm2 --out runs/smollm2-moe-8x2``
  (the README's conversion; the short CPT runs of claim 2 leave a split model far too broken,
  thousands in perplexity, to score above chance, so they are not listed).

Run (about 10 minutes on the project's 2-core CPU with the defaults)::

    OMP_NUM_THREADS=2 .venv/bin/python experiments/task_accuracy.py [--limit 200] [--shots 3]

The table goes to docs/results.md (section task-accuracy) and runs/task_accuracy.json.
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
from moeforge.eval.cost import parameter_counts  # noqa: E402
from moeforge.eval.report import device_description, update_section  # noqa: E402
from moeforge.eval.tasks import evaluate_task, resolve_task  # noqa: E402

TASKS = ("arithmetic", "arithmetic-choice")
MODELS = {
    "SmolLM2 (dense)": "smollm2",
    "arithmetic fine-tune (dense)": "runs/merge_domains/arithmetic-ft/final",
    "merge of SmolLM2 + code + arithmetic fine-tunes, 3 experts top-1": "runs/merge_domains/merged-average",
    "SmolLM2 split into 8 experts top-2, no training": "runs/smollm2-moe-8x2",
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limit", type=int, default=200, help="problems per task")
    ap.add_argument("--shots", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default="runs/task_accuracy.json")
    ap.add_argument("--no-report", action="store_true", help="do not rewrite docs/results.md")
    ap.add_argument("--report-only", action="store_true", help="rewrite docs/results.md from --out (no model runs)")
    args = ap.parse_args()
    if args.report_only:
        write_report(json.loads((REPO / args.out).read_text()))
        return
    t0 = time.perf_counter()
    tasks = [resolve_task(t, args.limit) for t in TASKS]
    results, skipped = {}, []
    for label, path in MODELS.items():
        if path != "smollm2" and not (REPO / path / "config.json").is_file():
            skipped.append(f"{label} ({path} does not exist)")
            continue
        model, tok = moeforge.load_with_tokenizer(path if path == "smollm2" else str(REPO / path))
        row = {"path": path, "active_parameters": parameter_counts(model)["active"]}
        for task in tasks:
            r = evaluate_task(model, tok, task, shots=args.shots, chat="off", batch_size=args.batch_size)
            row[task.name] = r.to_dict()
            print(f"{label}: {task.name} {r.accuracy:.1%} ({r.correct}/{r.total}, {r.seconds:.0f} s)", flush=True)
        results[label] = row
    record = {"date": datetime.date.today().isoformat(), "device": device_description(), "args": vars(args),
              "seconds": time.perf_counter() - t0,
              "results": results, "skipped": skipped, "torch": torch.__version__, "threads": torch.get_num_threads()}
    out = REPO / args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    if not args.no_report:
        write_report(record)


def _device(record: dict) -> str:
    """The recorded device (which names torch), or the machine results before it was recorded came from."""
    return record.get("device") or f"the project's 2-core CPU, torch {record['torch']}"


def write_report(record: dict) -> None:
    a = record["args"]
    lines = [f"`OMP_NUM_THREADS=2 .venv/bin/python experiments/task_accuracy.py --limit {a['limit']} --shots "
             f"{a['shots']}` on {record['date']}, {_device(record)}, {record['threads']} torch threads; "
             f"{record['seconds'] / 60:.0f} min in all. {a['limit']} built-in arithmetic problems "
             "that no document of the arithmetic training domain holds, plain-text prompts after "
             f"{a['shots']} solved examples: `arithmetic` = greedy generation, exact match; `arithmetic-choice` = "
             "the same problems with 4 options scored by log-likelihood (chance 25%). Brackets: 95% Wilson interval.",
             "", "| model | active params | arithmetic (generate) | arithmetic-choice |", "|---|---:|---:|---:|"]
    for label, row in record["results"].items():
        cells = []
        for task in TASKS:
            r = row[task]
            lo, hi = r["interval95"]
            cells.append(f"{r['accuracy']:.1%} [{lo:.0%}-{hi:.0%}]")
        lines.append(f"| {label} | {row['active_parameters'] / 1e6:.1f}M | " + " | ".join(cells) + " |")
    res = record["results"]

    def acc(label: str, task: str) -> str:
        return f"{res[label][task]['accuracy']:.1%}"

    base, tuned = "SmolLM2 (dense)", "arithmetic fine-tune (dense)"
    merged = next((k for k in res if k.startswith("merge")), None)
    split = next((k for k in res if k.startswith("SmolLM2 split")), None)
    notes = []
    if tuned in res and merged:
        notes.append(f"The arithmetic fine-tune (experiments/merge_domains.py, on the arithmetic domain's train "
                     f"split, whose documents hold none of these problems) lifts exact-match accuracy from {acc(base, 'arithmetic')} to "
                     f"{acc(tuned, 'arithmetic')}; the merge keeps {acc(merged, 'arithmetic')} "
                     f"({acc(merged, 'arithmetic-choice')} vs {acc(tuned, 'arithmetic-choice')} on the choice version) "
                     "at one dense model's active parameters, since its router sends arithmetic to the fine-tune's "
                     "expert (previous section).")
    if split:
        notes.append(f"Splitting without training loses what the dense model had ({acc(split, 'arithmetic')} / "
                     f"{acc(split, 'arithmetic-choice')}, chance on the choice version being 25%): a split model "
                     "needs continual pre-training before it is useful (claim 2).")
    for note in notes:
        lines += ["", note]
    if record["skipped"]:
        lines += ["", "Not measured (build them first): " + "; ".join(record["skipped"]) + "."]
    update_section("task-accuracy", "\n".join(lines), title="Task accuracy (arithmetic)")


if __name__ == "__main__":
    main()
