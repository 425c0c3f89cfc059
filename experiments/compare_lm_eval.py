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

Only the scoring is compared: the harness's dataset prompt templates (ARC, HellaSwag, ...) need its
datasets from the Hugging Face hub, which this machine cannot reach.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import moeforge  # noqa: E402
from moeforge.eval.tasks import (  # noqa: E402
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


if __name__ == "__main__":
    main()
