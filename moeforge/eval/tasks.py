"""Task accuracy: generated answers scored by exact match, or multiple choice scored by likelihood.

Perplexity says how well a model predicts text; the papers moeforge reproduces report what it
gets right (LLaMA-MoE: accuracy on downstream tasks; the SFT recipe: GSM8K). Two kinds of task:

* ``generate``: greedy decoding from a prompt, then exact match. A numeric gold answer is compared
  with the number the reply commits to: the first number after ``####`` (GSM8K's convention, which
  the SFT recipe trains) when the reply has one, else the reply's last number (lm-evaluation-harness's
  "flexible extract"). Other answers are compared as normalised text (case, surrounding whitespace
  and final punctuation ignored) with the reply's first line.
* ``choice``: the model's log-likelihood of each candidate continuation after the context; the
  highest sum wins (``accuracy``), and the highest sum per character of the choice, the space before
  it not counted (``accuracy_norm``, lm-evaluation-harness's ``acc_norm``).

Tasks by name (:data:`TASK_NAMES`):

* ``arithmetic`` (generate) and ``arithmetic-choice`` (choice, 4 options): integer arithmetic in the
  built-in domain's surface form (``17 + 25 = 42``), problems that no document of that domain
  holds (so training on it cannot memorise them); present on every machine.
* ``gsm8k`` (generate): GSM8K's test split from the benchmark data folder, gold answer the number
  after ``####``; few-shot examples come from its train split.

A JSONL (or JSON list) file is a task too: records with ``question`` (or ``prompt``/``input``) and
``answer`` (or ``target``/``output``) are ``generate``; records that add ``choices`` (a list of
strings, ``answer`` the index or the text of the right one) are ``choice``: a ``question`` is asked
as ``Question: ...\nAnswer:``, a ``context`` (or ``prompt``/``input``) is continued as written, and
each choice follows after a space (unless one side already has it). The JSON exports of ARC
(``choices.text``/``choices.label``, ``answerKey``), HellaSwag (``ctx``, ``endings``, ``label``), PIQA
(``goal``, ``sol1``, ``sol2``, ``label``) and SciQ (``support``, ``question``, ``distractor1-3``,
``correct_answer``) are read as they come, with lm-evaluation-harness's prompts for those datasets
(not checked against that harness's own numbers).

Prompts: ``generate`` tasks go through the tokenizer's chat template when it has one (``chat="auto"``),
as a user turn, with few-shot examples as earlier turns; otherwise (or ``chat="off"``) they are
rendered as plain text (``Question: ...\\nAnswer:``, arithmetic as ``17 + 25 =``) and the reply is cut
at the task's stop strings. ``choice`` tasks are always scored on plain text.
"""

from __future__ import annotations

import functools
import math
import random
import re
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import PreTrainedModel

from ..data.builtin import arithmetic_lines
from ..errors import MoeforgeError, closest
from ..utils.positions import model_context
from .corpora import data_root, json_records

GENERATE, CHOICE = "generate", "choice"
CHAT_MODES = ("auto", "on", "off")

# seeds of the built-in task's problems: the arithmetic domain's documents use seeds 0..99
_TASK_SEED, _FEWSHOT_SEED = 1_000_003, 2_000_003


@dataclass(frozen=True)
class TaskExample:
    """One problem.

    Attributes:
        prompt: the question (``generate``) or the context to continue (``choice``).
        answer: the gold answer; for ``choice``, the text of the right choice.
        solution: the worked answer shown when the example is a few-shot demonstration
            (defaults to ``answer``; GSM8K's full solution).
        choices: the candidate continuations (``choice`` tasks only).
        label: index of the right choice in ``choices``.
    """

    prompt: str
    answer: str
    solution: str | None = None
    choices: tuple[str, ...] = ()
    label: int | None = None


@dataclass(frozen=True)
class Task:
    """A named set of problems and how to render them.

    Attributes:
        name: key of the report.
        kind: ``generate`` or ``choice``.
        examples: the scored problems.
        source: where they came from, for reports.
        fewshot: solved problems that ``shots`` demonstrations are drawn from (never scored).
        plain_template: plain-text rendering of a prompt (``{prompt}`` is replaced).
        stop: strings that end a plain-text reply (the reply is cut at the first).
        max_new_tokens: generation budget per problem.
    """

    name: str
    kind: str
    examples: tuple[TaskExample, ...]
    source: str
    fewshot: tuple[TaskExample, ...] = ()
    plain_template: str = "Question: {prompt}\nAnswer:"
    stop: tuple[str, ...] = ("\n\nQuestion:", "\n\n\n")
    max_new_tokens: int = 256


@dataclass
class TaskResult:
    """Accuracy of one task; ``samples`` holds one record per problem (prompt, reply, verdict)."""

    name: str
    kind: str
    source: str
    correct: int
    total: int
    seconds: float
    shots: int
    chat: bool
    accuracy_norm: float | None = None
    generated_tokens: int = 0
    samples: list[dict] = field(default_factory=list)

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def interval(self) -> tuple[float, float]:
        """95% Wilson score interval of the accuracy (what a sample of ``total`` problems pins down)."""
        n = self.total
        if n == 0:
            return float("nan"), float("nan")
        z, p = 1.959964, self.accuracy
        centre = (p + z * z / (2 * n)) / (1 + z * z / n)
        half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
        return max(0.0, centre - half), min(1.0, centre + half)

    def to_dict(self) -> dict:
        lo, hi = self.interval
        return {"kind": self.kind, "source": self.source, "accuracy": self.accuracy, "correct": self.correct,
                "total": self.total, "interval95": [lo, hi], "accuracy_norm": self.accuracy_norm,
                "shots": self.shots, "chat": self.chat, "seconds": self.seconds,
                "generated_tokens": self.generated_tokens}


# ----------------------------------------------------------------------------- answers

# a decimal may start at its point (``.5``, as parse_number reads a gold answer), but not continue a number (``1.2.3``);
# a minus sign never follows a letter or digit (``10-20`` and ``COVID-19`` hold a hyphen, not -20 and -19);
# commas separate thousands (``1,234,567``), not the numbers of a list (``2,3,5`` is three numbers, not 235)
_NUMBER = re.compile(r"(?:(?<![^\W_])-)?\$?(?:(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|(?<!\d)\.\d+)")


def parse_number(text: str) -> float | None:
    """``text`` as a number when it is one (``1,234``, ``$18``, ``-3.50``, ``7.``), else None."""
    t = text.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        value = float(t)
    except ValueError:
        return None
    return value if math.isfinite(value) else None


def extract_number(reply: str) -> float | None:
    """The number a reply commits to: the first after ``####`` when there is one, else the last one.

    A typographic minus (U+2212, as in "−8" from a model that writes maths typography) is a minus
    sign; full-width digits are read as digits.
    """
    reply = unicodedata.normalize("NFKC", reply).replace("\u2212", "-")
    if "####" in reply:
        found = _NUMBER.findall(reply.split("####", 1)[1])
        if found:
            return parse_number(found[0])
    found = _NUMBER.findall(reply)
    return parse_number(found[-1]) if found else None


def normalise_text(text: str) -> str:
    """Lower case, single spaces, no surrounding whitespace or final ``.!?``."""
    return " ".join(text.lower().split()).rstrip(".!?").strip()


def is_correct(reply: str, gold: str) -> bool:
    """Exact match of a reply with a gold answer (numeric when the gold answer is a number)."""
    target = parse_number(gold)
    if target is not None:
        got = extract_number(reply)
        return got is not None and math.isclose(got, target, rel_tol=0.0, abs_tol=1e-6)
    first = next((line for line in reply.splitlines() if line.strip()), "")
    return normalise_text(first) == normalise_text(gold)


def cut_at_stop(reply: str, stop: Sequence[str]) -> str:
    """``reply`` up to the first stop string."""
    cut = len(reply)
    for s in stop:
        i = reply.find(s)
        if i >= 0:
            cut = min(cut, i)
    return reply[:cut]


# ----------------------------------------------------------------------------- tasks


@functools.lru_cache(maxsize=1)
def _domain_problems() -> frozenset[str]:
    """Every line of the built-in arithmetic domain (train and valid documents)."""
    from ..data.builtin import builtin_documents

    return frozenset(line for split in ("train", "valid") for doc in builtin_documents("arithmetic", split)
                     for line in doc.splitlines())


def _arithmetic_examples(count: int, seed: int, exclude: frozenset[str] = frozenset()) -> tuple[TaskExample, ...]:
    """``count`` distinct problems that no document of the arithmetic domain (nor ``exclude``) contains."""
    seen = _domain_problems() | exclude
    out, draw = [], 0
    while len(out) < count:
        for line in arithmetic_lines(4 * count, seed=seed + draw):
            if line not in seen and len(out) < count:
                seen = seen | {line}
                lhs, rhs = line.rsplit(" = ", 1)
                out.append(TaskExample(prompt=f"{lhs} =", answer=rhs))
        draw += 1
    return tuple(out)


def _lines(examples: tuple[TaskExample, ...]) -> frozenset[str]:
    return frozenset(f"{ex.prompt} {ex.answer}" for ex in examples)


def _arithmetic_choices(examples: tuple[TaskExample, ...], seed: int) -> tuple[TaskExample, ...]:
    """Four options per problem: the result and three near misses (off by 1, by 10, last digits swapped)."""
    rng = random.Random(seed)
    out = []
    for ex in examples:
        gold = int(ex.answer)
        wrong = [gold + rng.choice((-1, 1)), gold + rng.choice((-10, 10))]
        digits = str(abs(gold))
        swapped = int(digits[:-2] + digits[-1] + digits[-2]) * (1 if gold >= 0 else -1) if len(digits) > 1 else gold
        wrong.append(swapped if swapped != gold else gold + rng.choice((-2, 2, 100)))
        options = list(dict.fromkeys([gold, *wrong]))
        while len(options) < 4:
            options.append(gold + rng.randint(3, 30) * rng.choice((-1, 1)))
            options = list(dict.fromkeys(options))
        rng.shuffle(options)
        out.append(TaskExample(prompt=ex.prompt, answer=f" {gold}", choices=tuple(f" {o}" for o in options),
                               label=options.index(gold)))
    return tuple(out)


def _arithmetic_sets(limit: int | None) -> tuple[tuple[TaskExample, ...], tuple[TaskExample, ...]]:
    """(problems, few-shot demonstrations): disjoint, and absent from the arithmetic domain's documents."""
    fewshot = _arithmetic_examples(16, _FEWSHOT_SEED)
    return _arithmetic_examples(limit or 500, _TASK_SEED, exclude=_lines(fewshot)), fewshot


def arithmetic_task(limit: int | None = None) -> Task:
    examples, fewshot = _arithmetic_sets(limit)
    return Task("arithmetic", GENERATE, examples, "built-in arithmetic (problems no training document holds)",
                fewshot=fewshot, plain_template="{prompt}", stop=("\n",), max_new_tokens=32)


def arithmetic_choice_task(limit: int | None = None) -> Task:
    examples, fewshot = _arithmetic_sets(limit)
    return Task("arithmetic-choice", CHOICE, _arithmetic_choices(examples, _TASK_SEED),
                "built-in arithmetic, 4 options (problems no training document holds)",
                fewshot=_arithmetic_choices(fewshot, _FEWSHOT_SEED), plain_template="{prompt}")


def _gsm8k_example(record: dict, where: str) -> TaskExample:
    solution = record.get("answer")
    if not isinstance(record.get("question"), str) or not isinstance(solution, str) or "####" not in solution:
        raise MoeforgeError(f"{where}: a GSM8K record needs a question and an answer ending in '#### N'.")
    return TaskExample(prompt=record["question"], answer=solution.split("####", 1)[1].strip(), solution=solution)


def gsm8k_task(limit: int | None = None, root: Path | None = None) -> Task:
    root = data_root() if root is None else Path(root)
    test, train = root / "gsm8k" / "test.jsonl", root / "gsm8k" / "train.jsonl"
    if not test.is_file():
        raise MoeforgeError(
            f"task 'gsm8k' needs {test}, which does not exist; point $MOEFORGE_DATA at a folder holding "
            "gsm8k/test.jsonl, or pass the file's path as the task."
        )
    examples = tuple(_gsm8k_example(r, w) for r, w in _read_records(test, limit))
    if not examples:
        raise MoeforgeError(f"task 'gsm8k': {test} holds no records; it needs GSM8K's test split, one JSON object per line.")
    fewshot = tuple(_gsm8k_example(r, w) for r, w in _read_records(train, 16)) if train.is_file() else ()
    return Task("gsm8k", GENERATE, examples, str(test), fewshot=fewshot)


BUILTIN_TASKS: dict[str, Callable[..., Task]] = {
    "arithmetic": arithmetic_task,
    "arithmetic-choice": arithmetic_choice_task,
    "gsm8k": gsm8k_task,
}
TASK_NAMES = tuple(BUILTIN_TASKS)


def _read_records(path: Path, limit: int | None = None) -> list[tuple[dict, str]]:
    """(record, "path:line") pairs of a JSONL file or a JSON list, up to ``limit``."""
    try:
        raw = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise MoeforgeError(f"task file {path} is not UTF-8 text; pass a UTF-8 .jsonl file.") from None
    out = json_records(path, raw, limit)
    for record, where in out:
        if not isinstance(record, dict):
            raise MoeforgeError(f"{where}: expected a JSON object per record, got {type(record).__name__}.")
    return out  # type: ignore[return-value]


def _first_str(record: dict, keys: Sequence[str]) -> str | None:
    for key in keys:
        value = record.get(key)
        if isinstance(value, str) and value.strip():
            return value
    return None


def _label_index(value, count: int, where: str, labels: Sequence[str] | None = None) -> int:
    """A choice index from an int, a digit string, or one of ``labels`` (ARC's answerKey)."""
    if labels is not None and isinstance(value, str) and value in labels:
        return list(labels).index(value)
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < count:
        return value
    raise MoeforgeError(f"{where}: the answer of a choice record must be the index (0..{count - 1}) or the text of "
                        f"one of its choices, got {value!r}.")


def _hellaswag_clean(text: str) -> str:
    """HellaSwag's WikiHow markup removed (lm-evaluation-harness's preprocessing)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub(r"\[.*?\]", "", text).replace("  ", " ")


def _choice_layout(record: dict, where: str) -> tuple[str, list, int] | None:
    """(context, choices, right index) for the multiple-choice layouts of well-known datasets'
    JSON exports (ARC, HellaSwag, PIQA, SciQ) and the generic one (``choices`` list); None when the
    record has no choices. Contexts follow lm-evaluation-harness's prompts for those datasets."""
    choices = record.get("choices")
    if isinstance(choices, dict) and isinstance(record.get("question"), str):  # ARC: {"text": [...], "label": [...]}
        texts, labels = choices.get("text"), choices.get("label")
        if not isinstance(texts, list) or not isinstance(labels, list) or len(texts) != len(labels):
            raise MoeforgeError(f"{where}: ARC-style 'choices' must hold equally long 'text' and 'label' lists.")
        label = _label_index(record.get("answerKey", record.get("answer")), len(texts), where, labels)
        return f"Question: {record['question']}\nAnswer:", texts, label
    if isinstance(record.get("goal"), str) and "sol1" in record:  # PIQA
        return (f"Question: {record['goal']}\nAnswer:", [record.get("sol1"), record.get("sol2")],
                _label_index(record.get("label"), 2, where))
    if isinstance(record.get("correct_answer"), str) and "distractor1" in record:  # SciQ
        support = record.get("support") or ""  # the harness: "{{support.lstrip()}}\nQuestion: ..." (empty: a lone newline)
        options = [record.get(f"distractor{i}") for i in (1, 2, 3)] + [record["correct_answer"]]
        return f"{support.lstrip()}\nQuestion: {record['question']}\nAnswer:", options, 3
    if isinstance(record.get("endings"), list) and isinstance(record.get("ctx_a", record.get("ctx")), str):  # HellaSwag
        # the harness: preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize())
        if isinstance(record.get("ctx_a"), str):
            ctx = record["ctx_a"] + " " + str(record.get("ctx_b") or "").capitalize()
        else:
            ctx = record["ctx"]
        label = record.get("activity_label")
        context = _hellaswag_clean(f"{label}: {ctx}" if isinstance(label, str) else ctx)
        return context, [_hellaswag_clean(e) if isinstance(e, str) else e for e in record["endings"]], \
            _label_index(record.get("label"), len(record["endings"]), where)
    if choices is None:
        return None
    if not isinstance(choices, list):
        raise MoeforgeError(f"{where}: 'choices' must be a list of at least two non-empty strings.")
    if isinstance(record.get("question"), str):
        context = f"Question: {record['question']}\nAnswer:"
    else:
        context = _first_str(record, ("context", "prompt", "input"))
        if context is None:
            raise MoeforgeError(f"{where}: a task record needs a question (or prompt/input/context) string; "
                                f"its keys are {sorted(record)}.")
    answer = record.get("answer", record.get("target", record.get("output", record.get("label"))))
    if isinstance(answer, str) and answer in choices:
        return context, choices, choices.index(answer)
    return context, choices, _label_index(answer, len(choices), where)


def _file_example(record: dict, where: str) -> TaskExample:
    layout = _choice_layout(record, where)
    if layout is not None:
        context, choices, label = layout
        if len(choices) < 2 or not all(isinstance(c, str) and c.strip() for c in choices):
            raise MoeforgeError(f"{where}: 'choices' must be a list of at least two non-empty strings.")
        # lm-evaluation-harness's target delimiter: a space between context and choice unless there is one
        spaced = tuple(c if c[:1].isspace() or context[-1:].isspace() else " " + c for c in choices)
        return TaskExample(prompt=context, answer=spaced[label], choices=spaced, label=label)
    prompt = _first_str(record, ("question", "prompt", "input", "context"))
    if prompt is None:
        raise MoeforgeError(f"{where}: a task record needs a question (or prompt/input/context) string; "
                            f"its keys are {sorted(record)}.")
    answer = record.get("answer", record.get("target", record.get("output", record.get("label"))))
    if isinstance(answer, bool) or not isinstance(answer, str | int | float) or str(answer).strip() == "":
        raise MoeforgeError(f"{where}: a task record needs an answer (or target/output) string or number; "
                            f"its keys are {sorted(record)}.")
    solution = answer if isinstance(answer, str) else None
    gold = str(answer)
    if "####" in gold:  # GSM8K-style worked answer: the gold answer is what follows the marker
        gold = gold.split("####", 1)[1].strip()
    return TaskExample(prompt=prompt, answer=gold, solution=solution)


def read_task_file(path: str | Path, limit: int | None = None) -> Task:
    """A :class:`Task` from a JSONL/JSON file of question/answer (or question/choices/answer) records."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MoeforgeError(f"task {path} is a directory; pass a .jsonl file inside it, or a task name.")
    if not path.is_file():
        raise MoeforgeError(f"task file {path} does not exist; pass an existing .jsonl file or a task name "
                            f"({', '.join(TASK_NAMES)}).")
    if path.suffix.lower() not in (".jsonl", ".json"):
        raise MoeforgeError(f"task file {path} has suffix {path.suffix!r}; tasks are read from .jsonl or .json files.")
    examples = tuple(_file_example(r, w) for r, w in _read_records(path, limit))
    if not examples:
        raise MoeforgeError(f"task file {path} holds no records.")
    kinds = {CHOICE if ex.choices else GENERATE for ex in examples}
    if len(kinds) > 1:
        raise MoeforgeError(f"task file {path} mixes choice records (with 'choices') and answer records; "
                            "put them in two files.")
    kind = kinds.pop()  # choice contexts are rendered per record (their layouts differ)
    return Task(_file_task_name(path), kind, examples, str(path),
                plain_template="{prompt}" if kind == CHOICE else Task.plain_template)


#: file names that say which split a file is, not which task: such a file is named with its folder
SPLIT_NAMES = frozenset({"test", "train", "valid", "validation", "val", "dev", "eval"})


def _file_task_name(path: Path) -> str:
    """A task file's name: its stem (``arith_quiz.jsonl`` -> ``arith_quiz``), with its folder when
    the stem only names a split (``data/gsm8k/test.jsonl`` -> ``gsm8k/test``)."""
    folder = path.resolve().parent.name
    if path.stem.lower() in SPLIT_NAMES and folder:
        return f"{folder}/{path.stem}"
    return path.stem


def resolve_task(name_or_path: str, limit: int | None = None, root: Path | None = None) -> Task:
    """A :class:`Task` from a name (:data:`TASK_NAMES`) or a file path, cut to ``limit`` problems."""
    if limit is not None and limit < 1:
        raise MoeforgeError(f"the task limit must be at least 1 problem, got {limit}.")
    key = name_or_path.lower()
    if key in BUILTIN_TASKS:
        if key == "gsm8k":
            return gsm8k_task(limit, root)
        return BUILTIN_TASKS[key](limit)
    path = Path(name_or_path).expanduser()
    if path.exists() or "/" in name_or_path or path.suffix:
        return read_task_file(path, limit)
    raise MoeforgeError(f"unknown task {name_or_path!r}.{closest(key, TASK_NAMES)} Known tasks: "
                        f"{', '.join(TASK_NAMES)}; or pass a .jsonl file of question/answer records.")


def resolve_tasks(names_or_paths: Sequence[str], limit: int | None = None) -> list[Task]:
    """:func:`resolve_task` of each, refusing two that come out under one name (results are keyed by
    it: ``a/quiz.jsonl`` and ``b/quiz.jsonl`` would overwrite each other)."""
    tasks = [resolve_task(t, limit) for t in names_or_paths]
    names = [t.name for t in tasks]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise MoeforgeError(f"task {twice[0]!r} given twice; name each task once (task files are named by their "
                            "file name without the suffix, with their folder when the file is named after a split "
                            "such as test.jsonl: rename one of them).")
    return tasks


# ----------------------------------------------------------------------------- prompts


def use_chat(tokenizer, chat: str) -> bool:
    """Whether prompts go through the tokenizer's chat template (``chat``: auto, on or off)."""
    if chat not in CHAT_MODES:
        raise MoeforgeError(f"chat must be one of {', '.join(CHAT_MODES)}, got {chat!r}.")
    has_template = bool(getattr(tokenizer, "chat_template", None))
    if chat == "on" and not has_template:
        raise MoeforgeError("chat 'on' needs a tokenizer with a chat template, and this one has none; "
                            "use chat 'off' (plain-text prompts) or 'auto'.")
    return has_template if chat == "auto" else chat == "on"


def encode(tokenizer, text: str) -> list[int]:
    """``text``'s token ids with the special tokens the tokenizer puts in front (a BOS) but none it
    appends: a tokenizer set to end every input with an end-of-sequence token (``add_eos_token``, a
    ``$A </s>`` post-processor) would otherwise end each prompt there and shift every choice's tokens."""
    ids = list(tokenizer(text).input_ids)
    probe = list(tokenizer("a").input_ids)
    plain = list(tokenizer("a", add_special_tokens=False).input_ids)
    start = next((i for i in range(len(probe) - len(plain) + 1) if probe[i:i + len(plain)] == plain), None)
    appended = 0 if start is None else len(probe) - start - len(plain)
    return ids[:len(ids) - appended] if appended else ids


def prompt_ids(task: Task, example: TaskExample, tokenizer, *, shots: int, chat: bool) -> list[int]:
    """Token ids of a ``generate`` prompt with ``shots`` demonstrations from ``task.fewshot``."""
    demos = task.fewshot[:shots]
    if chat:
        messages = []
        for d in demos:
            messages += [{"role": "user", "content": d.prompt}, {"role": "assistant", "content": d.solution or d.answer}]
        messages.append({"role": "user", "content": example.prompt})
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
        return list(ids)
    return encode(tokenizer, plain_demos(task, shots) + task.plain_template.format(prompt=example.prompt))


def plain_demos(task: Task, shots: int) -> str:
    """The first ``shots`` few-shot examples as plain text, each followed by a blank line."""
    out = []
    for d in task.fewshot[:shots]:
        answer = d.solution or d.answer
        out.append(task.plain_template.format(prompt=d.prompt) + ("" if answer.startswith(" ") else " ") + answer + "\n\n")
    return "".join(out)


# ----------------------------------------------------------------------------- scoring


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    for value in (getattr(getattr(model, "generation_config", None), "eos_token_id", None), tokenizer.eos_token_id):
        for v in value if isinstance(value, list | tuple) else [value]:
            if isinstance(v, int) and v not in ids:
                ids.append(v)
    return ids


@torch.no_grad()
def generate_replies(model, tokenizer, prompts: Sequence[list[int]], *, max_new_tokens: int, batch_size: int,
                     stop: Sequence[str] = (), progress: Callable[[int], None] | None = None) -> list[list[int]]:
    """Greedy continuations of ``prompts`` (token id lists), batched with left padding.

    Prompts are batched longest first so a batch pads little; each reply is returned without its
    prompt, cut after the first end-of-sequence token. Rows run on ``model.generate`` (transformers
    models and moeforge compositions alike), so replies equal unbatched greedy decoding. ``stop``
    strings end a transformers model's batch early once every row has produced one (the caller
    still cuts each reply at its first stop string).
    """
    eos = _eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos[0] if eos else 0)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: -len(prompts[i]))
    replies: list[list[int]] = [[] for _ in prompts]
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        width = max(len(prompts[i]) for i in rows)
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, i in enumerate(rows):
            p = prompts[i]
            ids[r, width - len(p):] = torch.tensor(p, dtype=torch.long)
            mask[r, width - len(p):] = 1
        kwargs = {"max_new_tokens": max_new_tokens, "do_sample": False, "pad_token_id": pad}
        if eos:
            kwargs["eos_token_id"] = eos
        if isinstance(model, PreTrainedModel):  # greedy: no sampling settings from the checkpoint's config
            kwargs.update(temperature=None, top_p=None, top_k=None)
            if stop:
                kwargs.update(stop_strings=list(stop), tokenizer=tokenizer)
        out = model.generate(ids.to(device), attention_mask=mask.to(device), **kwargs)
        for r, i in enumerate(rows):
            new = out[r, width:].tolist()
            cut = next((j + 1 for j, t in enumerate(new) if t in eos), len(new))
            replies[i] = new[:cut]
        if progress:
            progress(min(start + batch_size, len(order)))
    return replies


def choice_loglikelihoods(model, tokenizer, context: str, choices: Sequence[str]) -> list[float]:
    """Sum of log p(choice tokens | context) for each choice (one right-padded forward pass).

    lm-evaluation-harness's boundary: whitespace ending the context moves to the front of each choice,
    the context is tokenised with the tokenizer's special tokens, and a choice's tokens are those that
    context + choice tokenised together has after the context's (a choice tokenised on its own gets a
    lone space token from tokenizers that prepend one, as LLaMA-2's and Mistral's do). Every choice is
    scored after the same context tokens.
    """
    return batch_loglikelihoods(model, tokenizer, [(context, choices)])[0]


@torch.no_grad()
def batch_loglikelihoods(model, tokenizer, problems: Sequence[tuple[str, Sequence[str]]]) -> list[list[float]]:
    """:func:`choice_loglikelihoods` of several (context, choices) problems in one forward pass."""
    rows, conts = [], []
    for context, choices in problems:
        stripped = context.rstrip()
        ctx = encode(tokenizer, stripped)
        if not ctx:
            raise MoeforgeError(f"the choice context {context!r} tokenises to nothing (and the tokenizer adds no BOS "
                                "token); give each problem some context.")
        for c in choices:
            cont = encode(tokenizer, context + c)[len(ctx):]
            if not cont:
                raise MoeforgeError(f"choice {c!r} of {context[-40:]!r} tokenises to nothing; give each choice some text.")
            rows.append(ctx + cont)
            conts.append((len(ctx), cont))
    width = max(len(r) for r in rows)
    context_size = model_context(model)
    if context_size is not None and width > context_size:
        tail = [context for context, choices in problems for _ in choices][[len(r) for r in rows].index(width)][-40:]
        raise MoeforgeError(f"the choice problem ending {tail!r} is {width} tokens with its longest choice, more than "
                            f"the model's context of {context_size}; use fewer shots or shorter contexts.")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(model.parameters()).device
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, row in enumerate(rows):
        ids[r, :len(row)] = torch.tensor(row)
        mask[r, :len(row)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    scores = []
    for r, (start, cont) in enumerate(conts):  # log-softmax only at the scored positions
        logp = torch.log_softmax(logits[r, start - 1:start - 1 + len(cont)].float(), dim=-1)
        scores.append(float(logp[torch.arange(len(cont)), torch.tensor(cont, device=logp.device)].sum()))
    out, i = [], 0
    for _, choices in problems:
        out.append(scores[i:i + len(choices)])
        i += len(choices)
    return out


def evaluate_task(model, tokenizer, task: Task, *, shots: int = 0, chat: str = "auto", batch_size: int = 8,
                  max_new_tokens: int | None = None, progress: Callable[[str], None] | None = None) -> TaskResult:
    """Accuracy of ``model`` on ``task`` (see the module docstring for the scoring)."""
    if shots < 0:
        raise MoeforgeError(f"shots must be 0 or more, got {shots}.")
    if shots > len(task.fewshot):
        have = len(task.fewshot)
        raise MoeforgeError(f"task {task.name!r} has {have} few-shot example{'s' if have != 1 else ''}, fewer than "
                            f"the {shots} shots asked for; use --shots {have} or less.")
    if batch_size < 1:
        raise MoeforgeError(f"batch_size must be at least 1, got {batch_size}.")
    if not task.examples:
        raise MoeforgeError(f"task {task.name!r} ({task.source}) has no problems; give it at least one.")
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    try:
        if task.kind == CHOICE:
            result = _score_choices(model, tokenizer, task, shots, batch_size, progress)
        else:
            result = _score_generation(model, tokenizer, task, shots=shots, chat=use_chat(tokenizer, chat),
                                       batch_size=batch_size, max_new_tokens=max_new_tokens or task.max_new_tokens,
                                       progress=progress)
    finally:
        model.train(was_training)
    result.seconds = time.perf_counter() - t0
    return result


def _score_generation(model, tokenizer, task, *, shots, chat, batch_size, max_new_tokens, progress) -> TaskResult:
    prompts = [prompt_ids(task, ex, tokenizer, shots=shots, chat=chat) for ex in task.examples]
    context = model_context(model)
    longest = max(len(p) for p in prompts) + max_new_tokens
    if context is not None and longest > context:
        raise MoeforgeError(f"task {task.name!r}: its longest prompt plus {max_new_tokens} new tokens is {longest} "
                            f"tokens, more than the model's context of {context}; use fewer shots or --max-new-tokens.")
    report = (lambda n: progress(f"{task.name}: {n}/{len(prompts)} problems")) if progress else None
    replies = generate_replies(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                               stop=() if chat else task.stop, progress=report)
    samples, correct, generated = [], 0, 0
    for ex, reply in zip(task.examples, replies):
        generated += len(reply)
        text = tokenizer.decode(reply, skip_special_tokens=True)
        if not chat:
            text = cut_at_stop(text, task.stop)
        ok = is_correct(text, ex.answer)
        correct += ok
        samples.append({"prompt": ex.prompt, "gold": ex.answer, "reply": text, "correct": ok})
    return TaskResult(task.name, task.kind, task.source, correct, len(samples), 0.0, shots, chat,
                      generated_tokens=generated, samples=samples)


def _choice_length(choice: str) -> int:
    """Characters of a choice without the whitespace that separates it from the context (what
    lm-evaluation-harness's ``acc_norm`` divides by: the choice as the dataset has it)."""
    return len(choice.lstrip()) or len(choice) or 1


def _score_choices(model, tokenizer, task, shots, batch_size, progress) -> TaskResult:
    samples, correct, correct_norm = [], 0, 0
    demos = plain_demos(task, shots)
    examples = task.examples
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        batch = batch_loglikelihoods(model, tokenizer,
                                     [(demos + task.plain_template.format(prompt=ex.prompt), ex.choices) for ex in chunk])
        for ex, scores in zip(chunk, batch):
            per_char = [s / _choice_length(c) for s, c in zip(scores, ex.choices)]
            pick = max(range(len(scores)), key=scores.__getitem__)
            pick_norm = max(range(len(per_char)), key=per_char.__getitem__)
            correct += pick == ex.label
            correct_norm += pick_norm == ex.label
            samples.append({"prompt": ex.prompt, "gold": ex.answer, "reply": ex.choices[pick],
                            "correct": pick == ex.label, "loglikelihoods": scores})
        if progress:
            progress(f"{task.name}: {len(samples)}/{len(examples)} problems")
    total = len(samples)
    return TaskResult(task.name, task.kind, task.source, correct, total, 0.0, shots, False,
                      accuracy_norm=correct_norm / total, samples=samples)
