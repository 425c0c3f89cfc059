"""Task accuracy (moeforge.eval.tasks): answer extraction, task files, batched greedy decoding
against an unbatched reference, choice log-likelihoods against a hand-computed sum, and the CLI."""

import json

import pytest
import torch

from moeforge.errors import MoeforgeError
from moeforge.eval.tasks import (
    CHOICE,
    GENERATE,
    Task,
    TaskExample,
    TaskResult,
    batch_loglikelihoods,
    choice_loglikelihoods,
    evaluate_task,
    extract_number,
    generate_replies,
    is_correct,
    prompt_ids,
    resolve_task,
)

from .test_cli_eval import run
from .tiny import tiny_llama, tiny_moe, tiny_tokenizer


# ----------------------------------------------------------------------------- answers


@pytest.mark.parametrize("reply, number", [
    ("She makes 9 * 2 = $18 every day.\n#### 18", 18),
    ("#### 1,234 is the answer, not 5", 1234),
    ("The answer is -3.50.", -3.5),
    ("so 12 apples, then 7.", 7),
    ("no digits here", None),
    ("#### none\nbut 4 later", 4),  # a marker with no number falls back to the last number
    ("pages 10-20", 20), ("COVID-19", 19), ("x=-5", -5), ("17 - 25 = -8", -8),  # a hyphen after a word is no sign
    ("the primes 2,3,5", 5), ("scores 12,15", 15), ("1,000,000 or 1,234.5", 1234.5),  # commas group thousands only
    (".5", 0.5), ("-.25 left", -0.25), ("$.75 each", 0.75), ("version 1.2.3", 3),  # decimals without a leading 0
    ("17 \u2212 25 = \u22128", -8), ("#### \uff14\uff12", 42),  # typographic minus, full-width digits
])
def test_extract_number(reply, number):
    assert extract_number(reply) == number


def test_is_correct_numeric_and_text():
    assert is_correct(".5", ".5") and is_correct("0.5", ".5")  # a reply equal to the gold answer matches
    assert is_correct(" 42\n", "42") and is_correct("it is $1,050.00", "1050")
    assert not is_correct("42 or 43", "42")  # the last number counts
    assert not is_correct("", "42")
    assert is_correct("  Paris.\nmore text", "paris") and not is_correct("Paris is big", "Paris")


def test_wilson_interval_matches_the_formula():
    lo, hi = TaskResult("t", GENERATE, "s", correct=5, total=10, seconds=0.0, shots=0, chat=False).interval
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = TaskResult("t", GENERATE, "s", correct=0, total=24, seconds=0.0, shots=0, chat=False).interval
    assert lo == 0.0 and hi == pytest.approx(0.1380, abs=1e-4)


# ----------------------------------------------------------------------------- tasks


def test_builtin_tasks_are_held_out_and_well_formed():
    from moeforge.data import builtin_text

    task = resolve_task("arithmetic", limit=50)
    assert task.kind == GENERATE and len(task.examples) == 50 and len(task.fewshot) > 0
    training = set(builtin_text("arithmetic", "train").splitlines()) | set(builtin_text("arithmetic", "valid").splitlines())
    lines = {f"{ex.prompt} {ex.answer}" for ex in task.examples}
    assert not lines & training  # no problem a model trained on the domain has seen
    assert not lines & {f"{ex.prompt} {ex.answer}" for ex in task.fewshot}
    for ex in task.examples:
        assert eval(ex.prompt.rstrip("=")) == int(ex.answer)  # noqa: S307 - our own arithmetic strings
    choice = resolve_task("arithmetic-choice", limit=50)
    assert choice.kind == CHOICE
    for ex, plain in zip(choice.examples, task.examples):
        assert len(set(ex.choices)) == 4 and ex.choices[ex.label] == f" {plain.answer}"
    assert sorted({ex.label for ex in choice.examples}) == [0, 1, 2, 3]  # the right answer's slot is shuffled


def test_task_files(tmp_path):
    gen = tmp_path / "qa.jsonl"
    gen.write_text(json.dumps({"question": "2+2?", "answer": "Two and two.\n#### 4"}) + "\n"
                   + json.dumps({"prompt": "Capital of France?", "target": "Paris"}) + "\n"
                   + json.dumps({"input": "7*6", "output": 42}) + "\n")
    task = resolve_task(str(gen))
    assert task.name == "qa" and task.kind == GENERATE
    assert [ex.answer for ex in task.examples] == ["4", "Paris", "42"]
    assert task.examples[0].solution.endswith("#### 4")
    assert len(resolve_task(str(gen), limit=2).examples) == 2
    mc = tmp_path / "mc.json"
    mc.write_text(json.dumps([{"question": "Sky?", "choices": [" blue", " green"], "answer": 0},
                              {"context": "Grass is", "choices": [" blue", " green"], "answer": " green"}]))
    task = resolve_task(str(mc))
    assert task.kind == CHOICE and [ex.label for ex in task.examples] == [0, 1]
    assert task.plain_template == "{prompt}"  # continued as written


DATASET_RECORDS = {
    "arc": ({"id": "Mercury_1", "question": "Which gas do plants take in?", "answerKey": "B",
             "choices": {"text": ["oxygen", "carbon dioxide", "helium"], "label": ["A", "B", "C"]}},
            "Question: Which gas do plants take in?\nAnswer:", (" oxygen", " carbon dioxide", " helium"), 1),
    "arc-digits": ({"question": "2+2?", "answerKey": "2", "choices": {"text": ["3", "4"], "label": ["1", "2"]}},
                   "Question: 2+2?\nAnswer:", (" 3", " 4"), 1),
    "hellaswag": ({"activity_label": "Baking cookies", "ctx": "A woman [header] puts dough on a tray. She",
                   "endings": ["bakes it.", "eats the tray."], "label": "0"},
                  "Baking cookies: A woman puts dough on a tray. She", (" bakes it.", " eats the tray."), 0),
    # the dataset's own fields: the harness builds the context from ctx_a and ctx_b (capitalised), not ctx
    "hellaswag-hf": ({"activity_label": "Removing ice from car", "ctx_a": "Then, the man writes over the snow.",
                      "ctx_b": "then", "ctx": "Then, the man writes over the snow. then",
                      "endings": [", the man adds wax to the windshield.", ", a woman stands."], "label": "1"},
                     "Removing ice from car: Then, the man writes over the snow. Then",
                     (" , the man adds wax to the windshield.", " , a woman stands."), 1),
    "piqa": ({"goal": "Open a jar", "sol1": "twist the lid", "sol2": "freeze it", "label": 0},
             "Question: Open a jar\nAnswer:", (" twist the lid", " freeze it"), 0),
    "sciq": ({"question": "What do bees make?", "distractor1": "milk", "distractor2": "silk", "distractor3": "wax paper",
              "correct_answer": "honey", "support": "Bees collect nectar."},
             "Bees collect nectar.\nQuestion: What do bees make?\nAnswer:", (" milk", " silk", " wax paper", " honey"), 3),
    "sciq-no-support": ({"question": "What do bees make?", "distractor1": "milk", "distractor2": "silk",
                         "distractor3": "wax", "correct_answer": "honey", "support": ""},
                        "\nQuestion: What do bees make?\nAnswer:", (" milk", " silk", " wax", " honey"), 3),
    "mmlu": ({"question": "7 * 6 =", "subject": "math", "choices": ["42", "36", "48", "13"], "answer": 0},
             "Question: 7 * 6 =\nAnswer:", (" 42", " 36", " 48", " 13"), 0),
}


@pytest.mark.parametrize("name", list(DATASET_RECORDS))
def test_well_known_dataset_layouts_are_read_as_they_come(tmp_path, name):
    record, context, choices, label = DATASET_RECORDS[name]
    f = tmp_path / f"{name}.jsonl"
    f.write_text(json.dumps(record) + "\n")
    (ex,) = resolve_task(str(f)).examples
    assert (ex.prompt, ex.choices, ex.label, ex.answer) == (context, choices, label, choices[label])


@pytest.mark.parametrize("records, message", [
    ([{"question": "q"}], "needs an answer"),
    ([{"answer": "a"}], "needs a question"),
    ([{"question": "q", "choices": ["a"], "answer": 0}], "at least two"),
    ([{"question": "q", "choices": ["a", "b"], "answer": 2}], r"index \(0\.\.1\) or the text"),
    ([{"question": "q", "answer": "a"}, {"question": "q", "choices": ["a", "b"], "answer": 1}], "mixes"),
    ([["not", "a", "record"]], "JSON object"),
    ([], "holds no records"),
])
def test_bad_task_files(tmp_path, records, message):
    f = tmp_path / "t.jsonl"
    f.write_text("".join(json.dumps(r) + "\n" for r in records))
    with pytest.raises(MoeforgeError, match=message):
        resolve_task(str(f))


def test_bad_task_names(tmp_path):
    with pytest.raises(MoeforgeError, match="Did you mean 'arithmetic'"):
        resolve_task("arithmetc")
    with pytest.raises(MoeforgeError, match="does not exist"):
        resolve_task(str(tmp_path / "missing.jsonl"))
    with pytest.raises(MoeforgeError, match="gsm8k/test.jsonl"):
        resolve_task("gsm8k", root=tmp_path)
    (tmp_path / "t.txt").write_text("x")
    with pytest.raises(MoeforgeError, match="suffix"):
        resolve_task(str(tmp_path / "t.txt"))


@pytest.mark.parametrize("kind", [GENERATE, CHOICE])
def test_a_task_without_problems_is_refused(tmp_path, kind):
    """An empty GSM8K test split, or a Task built with no examples, is one clear error (was a
    ValueError from max() or a ZeroDivisionError)."""
    (tmp_path / "gsm8k").mkdir()
    (tmp_path / "gsm8k" / "test.jsonl").write_text("\n")
    with pytest.raises(MoeforgeError, match="holds no records"):
        resolve_task("gsm8k", root=tmp_path)
    with pytest.raises(MoeforgeError, match="has no problems"):
        evaluate_task(tiny_llama(), tiny_tokenizer(), Task("empty", kind, (), "test", plain_template="{prompt}"))


def test_gsm8k_from_a_data_folder(tmp_path):
    (tmp_path / "gsm8k").mkdir()
    rec = {"question": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = <<3+4=7>>7\n#### 7"}
    (tmp_path / "gsm8k" / "test.jsonl").write_text(json.dumps(rec) + "\n")
    (tmp_path / "gsm8k" / "train.jsonl").write_text(json.dumps(rec) + "\n")
    task = resolve_task("gsm8k", root=tmp_path)
    assert task.examples[0].answer == "7" and task.fewshot[0].solution == rec["answer"]


def test_a_task_file_named_after_its_split_takes_its_folder_name(tmp_path):
    rec = json.dumps({"question": "1+1?", "answer": "2"}) + "\n"
    (tmp_path / "gsm8k").mkdir()
    for path in (tmp_path / "gsm8k" / "test.jsonl", tmp_path / "gsm8k" / "Validation.jsonl", tmp_path / "quiz.jsonl"):
        path.write_text(rec)
    assert resolve_task(str(tmp_path / "gsm8k" / "test.jsonl")).name == "gsm8k/test"
    assert resolve_task(str(tmp_path / "gsm8k" / "Validation.jsonl")).name == "gsm8k/Validation"
    assert resolve_task(str(tmp_path / "quiz.jsonl")).name == "quiz"


def test_plain_prompt_with_shots():
    tok = tiny_tokenizer()
    task = resolve_task("arithmetic", limit=1)
    text = tok.decode(prompt_ids(task, task.examples[0], tok, shots=2, chat=False))
    demos = [f"{d.prompt} {d.answer}" for d in task.fewshot[:2]]
    assert text == f"{demos[0]}\n\n{demos[1]}\n\n{task.examples[0].prompt}"
    with pytest.raises(MoeforgeError, match="fewer than the 99 shots"):
        evaluate_task(tiny_llama(), tok, task, shots=99)


def test_chat_on_needs_a_template():
    task = resolve_task("arithmetic", limit=1)
    with pytest.raises(MoeforgeError, match="chat template, and this one has none"):
        evaluate_task(tiny_llama(), tiny_tokenizer(), task, chat="on")


# ----------------------------------------------------------------------------- decoding and scoring


def _greedy_reference(model, prompt: list[int], steps: int, eos: int) -> list[int]:
    """Unbatched greedy decoding by full forward passes (no cache, no padding)."""
    ids = list(prompt)
    out = []
    for _ in range(steps):
        with torch.no_grad():
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
        if nxt == eos:
            break
    return out


@pytest.mark.parametrize("make", [tiny_llama, tiny_moe], ids=["llama", "moeforge-moe"])
def test_batched_left_padded_generation_equals_unbatched_greedy(make):
    model, tok = make(), tiny_tokenizer()
    texts = ["17 + 25 =", "def f(x):\n    return", "The", "a much longer prompt about the language reference"]
    prompts = [tok(t).input_ids for t in texts]
    replies = generate_replies(model, tok, prompts, max_new_tokens=6, batch_size=3)
    for p, r in zip(prompts, replies):
        assert r == _greedy_reference(model, p, 6, tok.eos_token_id)


@pytest.mark.parametrize("make", [tiny_llama, tiny_moe], ids=["llama", "moeforge-moe"])
def test_choice_loglikelihoods_equal_a_hand_computed_sum(make):
    """Problems of different lengths batched in one right-padded pass score as each row alone."""
    model, tok = make(), tiny_tokenizer()
    problems = [("17 + 25 =", [" 42", " 1042", " x"]), ("def f(x):\n    return", [" x", " x + 1"])]
    got = batch_loglikelihoods(model, tok, problems)
    assert got[0] == pytest.approx(choice_loglikelihoods(model, tok, *problems[0]), abs=1e-5)  # alone
    for (context, choices), values in zip(problems, got):
        ctx = tok(context).input_ids
        for choice, value in zip(choices, values):
            cont = tok(choice, add_special_tokens=False).input_ids
            with torch.no_grad():
                logp = torch.log_softmax(model(input_ids=torch.tensor([ctx + cont])).logits[0].double(), -1)
            want = sum(float(logp[len(ctx) - 1 + j, t]) for j, t in enumerate(cont))
            assert value == pytest.approx(want, abs=1e-4)


def _prefix_space_tokenizer(append_eos: bool = False):
    """A tokenizer that, like LLaMA-2's and Mistral's legacy ones, writes spaces as '▁' and always
    prepends one: ' 42' tokenised alone is ['▁', '▁42'], but ['▁42'] after a context."""
    import tokenizers as tk
    from transformers import PreTrainedTokenizerFast

    from moeforge.data import builtin_text

    bpe = tk.Tokenizer(tk.models.BPE(unk_token="<unk>"))
    bpe.normalizer = tk.normalizers.Sequence([tk.normalizers.Prepend("\u2581"), tk.normalizers.Replace(" ", "\u2581")])
    bpe.pre_tokenizer = tk.pre_tokenizers.Split("\u2581", behavior="merged_with_next")  # no merges across words
    bpe.decoder = tk.decoders.Sequence([tk.decoders.Replace("\u2581", " "), tk.decoders.Fuse(), tk.decoders.Strip(" ", 1, 0)])
    trainer = tk.trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    bpe.train_from_iterator([builtin_text(d, "train")[:8000] for d in ("prose", "arithmetic")], trainer)
    single = "<s> $A </s>" if append_eos else "<s> $A"  # append_eos: as LLaMA tokenizers with add_eos_token=True
    bpe.post_processor = tk.processors.TemplateProcessing(single=single, special_tokens=[("<s>", 1), ("</s>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


def test_choice_tokens_are_those_of_context_and_choice_together():
    """lm-evaluation-harness's boundary: a context's trailing whitespace moves to the choice, and the
    choice's tokens are those the whole text has after the context's (a choice tokenised alone got
    a lone space token with a '▁'-prepending tokenizer, or after a context ending in a space)."""
    model, tok = tiny_llama(), tiny_tokenizer()
    spaced = choice_loglikelihoods(model, tok, "17 + 25 =", [" 42", " 43"])
    assert choice_loglikelihoods(model, tok, "17 + 25 = ", ["42", "43"]) == pytest.approx(spaced, abs=1e-6)
    sp = _prefix_space_tokenizer()
    assert len(sp(" 42", add_special_tokens=False).input_ids) > len(sp("x 42").input_ids) - len(sp("x").input_ids)
    ctx, whole = sp("17 + 25 =").input_ids, sp("17 + 25 = 42").input_ids
    assert whole[:len(ctx)] == ctx
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=torch.tensor([whole])).logits[0].double(), -1)
    want = sum(float(logp[j - 1, whole[j]]) for j in range(len(ctx), len(whole)))
    assert choice_loglikelihoods(model, sp, "17 + 25 =", [" 42"])[0] == pytest.approx(want, abs=1e-4)


def test_a_tokenizer_that_appends_an_end_token_scores_and_prompts_as_one_that_does_not():
    """A tokenizer that ends every input with </s> put it after the context (shifting each choice's
    tokens by one and scoring </s> as part of the choice) and at the end of every generation prompt."""
    model, bos_only, with_eos = tiny_llama(), _prefix_space_tokenizer(), _prefix_space_tokenizer(append_eos=True)
    assert with_eos("17 + 25").input_ids == bos_only("17 + 25").input_ids + [2]
    problems = [("17 + 25 =", [" 42", " 43", " 1042"]), ("The language", [" reference", " model"])]
    for got, want in zip(batch_loglikelihoods(model, with_eos, problems), batch_loglikelihoods(model, bos_only, problems)):
        assert got == pytest.approx(want, abs=1e-6)
    task = resolve_task("arithmetic", limit=2)
    for ex in task.examples:
        assert prompt_ids(task, ex, with_eos, shots=1, chat=False) == prompt_ids(task, ex, bos_only, shots=1, chat=False)


def test_choice_problems_past_the_models_context_are_refused():
    """A context plus choice longer than max_position_embeddings (256 here) was scored silently, at
    positions the model never trained on; generation prompts are refused, and so are these now."""
    model, tok = tiny_llama(), tiny_tokenizer()
    assert len(tok("word " * 400).input_ids) > 256
    with pytest.raises(MoeforgeError, match="more than the model's context of 256"):
        choice_loglikelihoods(model, tok, "word " * 400, [" a", " b"])
    task = Task("long", CHOICE, (TaskExample("word " * 400, " a", choices=(" a", " b"), label=0),), "test",
                plain_template="{prompt}")
    with pytest.raises(MoeforgeError, match="more than the model's context of 256"):
        evaluate_task(model, tok, task)


class _Oracle(torch.nn.Module):
    """Stands in for a model that answers arithmetic prompts: generate() appends ' <result + offset>\\n'."""

    def __init__(self, tok, offset: int) -> None:
        super().__init__()
        self.tok, self.offset, self.w = tok, offset, torch.nn.Parameter(torch.zeros(1))

    def generate(self, input_ids, attention_mask, max_new_tokens, **_):
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tok.decode(ids[mask.bool()].tolist()).rsplit("\n\n", 1)[-1]
            reply = self.tok(f" {eval(prompt.rstrip('=')) + self.offset}\n7 * 7 = 49").input_ids  # noqa: S307
            rows.append(ids.tolist() + reply[:max_new_tokens])
        width = max(map(len, rows))
        return torch.tensor([r + [0] * (width - len(r)) for r in rows])


@pytest.mark.parametrize("offset, accuracy", [(0, 1.0), (1, 0.0)])
def test_generation_scoring_end_to_end(offset, accuracy):
    """Rendering, decoding, cutting at the stop string and matching, on replies whose truth is known
    (the reply's extra line would be scored as the answer if it were not cut off)."""
    tok = tiny_tokenizer()
    task = resolve_task("arithmetic", limit=12)
    result = evaluate_task(_Oracle(tok, offset), tok, task, shots=2, chat="off", batch_size=5, max_new_tokens=40)
    assert result.accuracy == accuracy and result.total == 12
    assert all(s["reply"].strip().lstrip("-").isdigit() for s in result.samples)


def test_choice_scoring_picks_the_most_likely(monkeypatch):
    import moeforge.eval.tasks as tasks

    task = Task("t", CHOICE, (TaskExample("a", " y", choices=(" x", " y"), label=1),
                              TaskExample("b", " x", choices=(" x", " yyyyyyyy"), label=0)), "test",
                plain_template="{prompt}")
    scores = {"a": [-5.0, -1.0], "b": [-2.0, -8.0]}  # per byte, b's long choice wins (-1.0 vs -2.0)
    monkeypatch.setattr(tasks, "batch_loglikelihoods", lambda m, t, problems: [scores[ctx] for ctx, _ in problems])
    result = evaluate_task(tiny_llama(), tiny_tokenizer(), task)
    assert result.correct == 2 and result.accuracy_norm == 0.5


def test_accuracy_norm_divides_by_the_choices_characters(monkeypatch):
    """lm-evaluation-harness's acc_norm: log-likelihood over the choice's length in characters, the
    space before it not counted (was UTF-8 bytes with the space, which picked the other option here)."""
    import moeforge.eval.tasks as tasks

    task = Task("t", CHOICE, (TaskExample("a", " bbbb", choices=(" a", " bbbb"), label=1),
                              TaskExample("b", " ee", choices=(" \u00e9", " ee"), label=1)), "test",
                plain_template="{prompt}")
    scores = {"a": [-2.0, -7.0], "b": [-3.0, -5.0]}  # per character: -2 vs -1.75, -3 vs -2.5
    monkeypatch.setattr(tasks, "batch_loglikelihoods", lambda m, t, problems: [scores[ctx] for ctx, _ in problems])
    result = evaluate_task(tiny_llama(), tiny_tokenizer(), task)
    assert result.correct == 0 and result.accuracy_norm == 1.0


# ----------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("llama")
    tiny_llama().save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    return d


def test_cli_tasks_json_and_samples(llama_dir, tmp_path, capsys):
    samples = tmp_path / "out" / "samples.jsonl"
    code, out, _ = run(["eval", str(llama_dir), "--task", "arithmetic", "--task", "arithmetic-choice", "--limit", "3",
                        "--max-new-tokens", "4", "--json", "--samples", str(samples)], capsys)
    assert code in (0, None)
    report = json.loads(out)
    assert set(report["tasks"]) == {"arithmetic", "arithmetic-choice"} and "perplexity" not in report
    assert report["tasks"]["arithmetic"]["total"] == 3 and report["tasks"]["arithmetic"]["chat"] is False
    records = [json.loads(line) for line in samples.read_text().splitlines()]
    assert [r["task"] for r in records] == ["arithmetic"] * 3 + ["arithmetic-choice"] * 3


def test_cli_tasks_with_perplexity(llama_dir, capsys):
    code, out, _ = run(["eval", str(llama_dir), "-t", "arithmetic", "--limit", "2", "--max-new-tokens", "2",
                        "-d", "prose", "--max-tokens", "64", "--seq-len", "32"], capsys)
    assert code in (0, None)
    assert "perplexity" in out and "arithmetic" in out and "95% interval" in out


def test_cli_tasks_carry_the_expert_choice_caveat(tmp_path, capsys):
    """Causal expert choice makes each problem's scores depend on the others in its batch; the perplexity
    report said so, the task report did not."""
    d = tmp_path / "ec"
    tiny_moe(router="expert_choice", expert_choice_causal=True).save_pretrained(d)
    tiny_tokenizer().save_pretrained(d)
    argv = ["eval", str(d), "--task", "arithmetic-choice", "--limit", "4", "--batch-size", "2"]
    code, out, _ = run(argv, capsys)
    assert code in (0, None) and "note: causal expert-choice routing" in out and "(here 2)" in out
    code, out, _ = run([*argv, "--json"], capsys)
    assert "accuracy depends on the batch size" in json.loads(out)["notes"][0]
    code, out, _ = run(["eval", str(d), "--task", "arithmetic-choice", "--limit", "2", "-d", "prose",
                        "--max-tokens", "64", "--seq-len", "32", "--json"], capsys)
    notes = json.loads(out)["notes"]
    assert len(notes) == 2 and "windows of one batch" in notes[0] and "problems of one batch" in notes[1]


@pytest.mark.parametrize("argv, message", [
    (["--task", "arithmetc"], "Did you mean 'arithmetic'"),
    (["--shots", "2"], "apply to tasks"),
    (["--task", "arithmetic", "--chat", "maybe"], "--chat must be one of"),
    (["--task", "arithmetic", "--task", "arithmetic"], "given twice"),
    (["--task", "arithmetic", "--plots", "unused"], "--plots applies to the perplexity corpora"),
    (["--task", "arithmetic", "--seq-len", "64", "--max-tokens", "128"],
     "--max-tokens, --seq-len apply to the perplexity corpora"),
    (["--task", "arithmetic", "--html-tokens", "8"], "leave --html-tokens out"),
    (["--task", "arithmetic-choice", "--max-new-tokens", "8"], "every task given is multiple choice"),
])
def test_cli_bad_task_options(llama_dir, capsys, argv, message):
    code, _, err = run(["eval", str(llama_dir), *argv], capsys)
    assert code == 2 and message in err and "Traceback" not in err
