"""moeforge's multiple-choice scoring against lm-evaluation-harness's on the same model.

``moeforge eval --task`` scores a choice by the summed log-probability of its tokens after the
context, with lm-evaluation-harness's context/choice token boundary. This script sends the same
(context, choice) pairs through the harness's ``HFLM.loglikelihood`` and through
``moeforge.eval.tasks.batch_loglikelihoods`` on SmolLM2 and prints the largest difference and how
often both pick the same choice: the 40 first arithmetic-choice problems with 3 shots, plus
contexts that end in a space and a ``Question: ... Answer:`` prompt. It then compares greedy
generation: the 40 first ``arithmetic`` prompts (3 shots) through ``generate_replies`` and the
harness's ``generate_until``, each cut at the task's stop strings.

The harness is not a moeforge dependency; install it beside the project (it needs no torch of its
own when run on moeforge's interpreter) and put it on the path::

    python3 -m venv --system-site-packages /tmp/lmeval && /tmp/lmeval/bin/pip install lm_eval
    PYTHONPATH=$(ls -d /tmp/lmeval/lib/python3*/site-packages) .venv/bin/python experiments/compare_lm_eval.py

Last, the prompts moeforge builds from ARC, HellaSwag, PIQA and SciQ records are compared with the
harness's own construction (its task YAML templates, and HellaSwag's ``process_docs``) on sample
records written here, since the datasets themselves come from the Hugging Face hub.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import moeforge  # noqa: E402
from moeforge.eval.tasks import (  # noqa: E402
    _choice_layout,
    batch_loglikelihoods,
    cut_at_stop,
    generate_replies,
    plain_demos,
    prompt_ids,
    resolve_task,
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--limit", type=int, default=40, help="arithmetic-choice problems")
    ap.add_argument("--shots", type=int, default=3)
    args = ap.parse_args()
    try:
        from lm_eval.api.instance import Instance
        from lm_eval.models.huggingface import HFLM
    except ImportError:
        raise SystemExit("lm_eval is not importable; see this script's docstring for how to install it beside moeforge.")
    model, tok = moeforge.load_with_tokenizer(args.model)
    model.eval()
    task = resolve_task("arithmetic-choice", limit=args.limit)
    demos = plain_demos(task, args.shots)
    problems = [(demos + task.plain_template.format(prompt=ex.prompt), list(ex.choices)) for ex in task.examples]
    problems += [("The capital of France is ", ["Paris", "London", "a city"]),  # whitespace moves to the choice
                 ("Question: What colour is the sky?\nAnswer:", [" blue", " green", " the sea"])]
    ours = batch_loglikelihoods(model, tok, problems)
    harness = HFLM(pretrained=model, tokenizer=tok, batch_size=8)
    requests = [Instance(request_type="loglikelihood", doc={}, arguments=(ctx, c), idx=j)
                for ctx, choices in problems for j, c in enumerate(choices)]
    theirs = [ll for ll, _ in harness.loglikelihood(requests, disable_tqdm=True)]
    flat = [v for row in ours for v in row]
    same, k = 0, 0
    for row, (_, choices) in zip(ours, problems):
        other = theirs[k:k + len(choices)]
        k += len(choices)
        same += max(range(len(row)), key=row.__getitem__) == max(range(len(other)), key=other.__getitem__)
    diff = max(abs(a - b) for a, b in zip(flat, theirs))
    print(f"{args.model}: {len(flat)} (context, choice) pairs from {len(problems)} problems; "
          f"max |log-likelihood difference| {diff:.2e}; same choice picked on {same}/{len(problems)} problems")

    # greedy generation: the arithmetic task's plain prompts, cut at its stop strings
    gen = resolve_task("arithmetic", limit=args.limit)
    texts = [plain_demos(gen, args.shots) + gen.plain_template.format(prompt=ex.prompt) for ex in gen.examples]
    ids = [prompt_ids(gen, ex, tok, shots=args.shots, chat=False) for ex in gen.examples]
    replies = generate_replies(model, tok, ids, max_new_tokens=gen.max_new_tokens, batch_size=8, stop=gen.stop)
    ours_text = [cut_at_stop(tok.decode(r, skip_special_tokens=True), gen.stop) for r in replies]
    kwargs = {"until": list(gen.stop), "max_gen_toks": gen.max_new_tokens, "do_sample": False}
    theirs_text = harness.generate_until(
        [Instance(request_type="generate_until", doc={}, arguments=(t, kwargs), idx=0) for t in texts], disable_tqdm=True)
    agree = sum(a == b for a, b in zip(ours_text, theirs_text))
    print(f"{args.model}: greedy replies to {len(texts)} arithmetic prompts ({args.shots} shots) identical on "
          f"{agree}/{len(texts)} ({sum(bool(t.strip()) for t in ours_text)} non-empty; first: {ours_text[0]!r})")
    for a, b in zip(ours_text, theirs_text):
        if a != b:
            print(f"  differ: moeforge {a!r} vs harness {b!r}")
    compare_templates()


#: sample records in each dataset's own JSON layout (HellaSwag: the capitalised ctx_b, WikiHow markup;
#: SciQ: an empty and a padded support passage)
RECORDS = {
    "arc": {"question": "Which gas do plants take in?", "answerKey": "B",
            "choices": {"text": ["oxygen", "carbon dioxide"], "label": ["A", "B"]}},
    "hellaswag": {"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
                  "ctx_b": "then", "ctx": "Then, the man writes over the snow. then",
                  "endings": [", the man adds wax.", ", a woman stands."], "label": "1"},
    "hellaswag-markup": {"activity_label": "Baking cookies", "ctx_a": "A woman [header] puts dough on a tray.",
                         "ctx_b": "she BAKES it", "ctx": "A woman [header] puts dough on a tray. she BAKES it",
                         "endings": ["in the oven [title] now.", "on the tray."], "label": "0"},
    "piqa": {"goal": "Open a jar", "sol1": "twist the lid", "sol2": "freeze it", "label": 0},
    "sciq": {"question": "What do bees make?", "distractor1": "milk", "distractor2": "silk", "distractor3": "wax",
             "correct_answer": "honey", "support": ""},
    "sciq-support": {"question": "What do bees make?", "distractor1": "milk", "distractor2": "silk",
                     "distractor3": "wax", "correct_answer": "honey", "support": "  Bees collect nectar.  "},
}


def compare_templates() -> None:
    import datasets
    import lm_eval
    from lm_eval.utils import apply_template

    # HellaSwag's preprocessing, loaded from the harness's file (its package __init__ pulls in every metric)
    spec = importlib.util.spec_from_file_location(
        "hellaswag_utils", Path(lm_eval.__file__).parent / "tasks" / "hellaswag" / "utils.py")
    hellaswag = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(hellaswag)
    same = []
    for name, r in RECORDS.items():
        if name.startswith("hellaswag"):
            doc = hellaswag.process_docs(datasets.Dataset.from_list([r]))[0]
            theirs = (doc["query"], doc["choices"], doc["gold"])
        elif name.startswith("sciq"):  # sciq.yaml
            theirs = (apply_template("{{support.lstrip()}}\nQuestion: {{question}}\nAnswer:", r),
                      [r["distractor1"], r["distractor2"], r["distractor3"], r["correct_answer"]], 3)
        elif name == "arc":  # arc_easy.yaml / arc_challenge.yaml
            theirs = (apply_template("Question: {{question}}\nAnswer:", r), r["choices"]["text"],
                      r["choices"]["label"].index(r["answerKey"]))
        else:  # piqa.yaml
            theirs = (apply_template("Question: {{goal}}\nAnswer:", r), [r["sol1"], r["sol2"]], r["label"])
        context, choices, label = _choice_layout(r, name)
        if (context, list(choices), label) == (theirs[0], list(theirs[1]), theirs[2]):
            same.append(name)
        else:
            print(f"  {name} differs: moeforge {(context, choices, label)!r} vs harness {theirs!r}")
    print(f"dataset prompts: {len(same)}/{len(RECORDS)} sample records give the harness's context, choices and "
          f"answer ({', '.join(same)})")


if __name__ == "__main__":
    main()
