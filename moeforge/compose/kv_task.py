"""The synthetic key-value arithmetic task of CALM (Bansal et al. 2024, Sec. 4.1), scaled down.

Keys are short random lowercase strings, each mapped to an integer value. Expressions combine
2..``max_terms`` keys with + and -. Three tasks read those expressions (prompt -> target):

====================  ==========================  ==============
task                  prompt                      target
====================  ==========================  ==============
kv_substitution       ``abc+de-fgh:``             ``12+34-56``
numeric_arithmetic    ``12+34-56=``               ``-10``
kv_arithmetic         ``abc+de-fgh=``             ``-10``
====================  ==========================  ==============

The augmenting model m_A learns ``kv_substitution`` (it memorises the pairs; single-key lookups
``abc:12`` are part of its training data); the anchor m_B learns ``numeric_arithmetic``; the
composition is trained on ``kv_arithmetic`` over a subset of the keys and evaluated on
expressions built from the other keys only. The two tasks of the source models use different
separators (``:`` and ``=``) so that a prompt says which task is asked, as the paper's task
instructions do. Text is tokenized one character per token (:func:`char_tokenizer`), which both
models share.
"""

from __future__ import annotations

import random
import string
from dataclasses import dataclass

from ..errors import require

KEY_ALPHABET = string.ascii_lowercase
SYMBOLS = string.ascii_lowercase + string.digits + "+-=: "
PAD, BOS, EOS = "<pad>", "<s>", "</s>"
TASKS = ("kv_substitution", "numeric_arithmetic", "kv_arithmetic")

#: Chat template of the character tokenizer: ``<s>`` + prompt + answer + ``</s>``, so that
#: (prompt, answer) records train through ``moeforge train`` (chat data, loss on the answer)
#: in exactly the layout the experiment evaluates.
CHAT_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}{{ m['content'] }}"
    "{% if m['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)


def char_tokenizer():
    """A transformers fast tokenizer with one token per character of :data:`SYMBOLS` plus <pad>, <s>, </s>.

    Ids: <pad> 0, <s> 1, </s> 2, then the symbols in order. ``save_pretrained`` stores it beside
    a model so that :func:`moeforge.load_tokenizer` finds it.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {PAD: 0, BOS: 1, EOS: 2}
    for ch in SYMBOLS:
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=PAD))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, 1)])
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS, eos_token=EOS, pad_token=PAD, unk_token=PAD,
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


@dataclass
class KVTable:
    """Key -> value pairs, split into keys the composition trains on and held-out keys."""

    values: dict[str, int]
    train_keys: list[str]
    heldout_keys: list[str]
    max_terms: int = 3
    seed: int = 0
    spaced: bool = False
    """Write expressions with single spaces between tokens (``abc + de :``) instead of compactly."""

    @classmethod
    def generate(
        cls,
        num_keys: int,
        *,
        key_lengths: tuple[int, int] = (2, 4),
        max_value: int = 99,
        composition_fraction: float = 0.2,
        max_terms: int = 3,
        seed: int = 0,
        spaced: bool = False,
    ) -> KVTable:
        """``num_keys`` distinct keys of ``key_lengths[0]..key_lengths[1]`` letters, values 1..``max_value``.

        The first ``composition_fraction`` of the (shuffled) keys form the composition's training
        keys (the paper: 20%); the rest are held out.
        """
        require(num_keys >= 10, f"num_keys must be >= 10, got {num_keys}.")
        require(0 < composition_fraction < 1, f"composition_fraction must be in (0, 1), got {composition_fraction}.")
        lo, hi = key_lengths
        space = sum(len(KEY_ALPHABET) ** n for n in range(lo, hi + 1))
        require(num_keys <= space // 2, f"{num_keys} keys do not fit in {space} strings of {lo}..{hi} letters.")
        rng = random.Random(seed)
        keys: dict[str, int] = {}
        while len(keys) < num_keys:
            key = "".join(rng.choice(KEY_ALPHABET) for _ in range(rng.randint(lo, hi)))
            keys.setdefault(key, rng.randint(1, max_value))
        order = list(keys)
        rng.shuffle(order)
        cut = max(1, round(composition_fraction * num_keys))
        return cls(values=keys, train_keys=sorted(order[:cut]), heldout_keys=sorted(order[cut:]),
                   max_terms=max_terms, seed=seed, spaced=spaced)

    def expression(self, rng: random.Random, keys: list[str], terms: int) -> tuple[list[str], list[str]]:
        """Random keys and operators: (keys, ops) with ops[0] == "+" (the leading term is added)."""
        chosen = [rng.choice(keys) for _ in range(terms)]
        ops = ["+"] + [rng.choice("+-") for _ in range(terms - 1)]
        return chosen, ops

    def example(self, task: str, keys: list[str], ops: list[str]) -> tuple[str, str]:
        """(prompt, target) of ``task`` for one expression."""
        values = [self.values[k] for k in keys]
        sep = " " if self.spaced else ""
        key_expr = _join(keys, ops, sep)
        num_expr = _join([str(v) for v in values], ops, sep)
        result = sum(v if op == "+" else -v for v, op in zip(values, ops))
        if task == "kv_substitution":
            return key_expr + sep + ":", num_expr
        if task == "numeric_arithmetic":
            return num_expr + sep + "=", str(result)
        if task == "kv_arithmetic":
            return key_expr + sep + "=", str(result)
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")

    def sample(self, task: str, count: int, *, keys: list[str] | None = None, seed: int = 0,
               min_terms: int = 2, max_terms: int | None = None) -> list[tuple[str, str]]:
        """``count`` (prompt, target) examples with ``min_terms..max_terms`` keys drawn from ``keys``."""
        rng = random.Random(seed)
        keys = keys if keys is not None else list(self.values)
        hi = max_terms or self.max_terms
        out = []
        for _ in range(count):
            chosen, ops = self.expression(rng, keys, rng.randint(min_terms, hi))
            out.append(self.example(task, chosen, ops))
        return out

    def lookups(self, keys: list[str] | None = None) -> list[tuple[str, str]]:
        """Single-key substitutions ``abc:`` -> ``12`` for every key (m_A's memorisation data)."""
        keys = keys if keys is not None else list(self.values)
        sep = " " if self.spaced else ""
        return [(k + sep + ":", str(self.values[k])) for k in keys]


def numeric_sample(count: int, *, max_value: int = 99, min_terms: int = 2, max_terms: int = 3,
                   seed: int = 0, spaced: bool = False, space_jitter: int = 0) -> list[tuple[str, str]]:
    """``numeric_arithmetic`` examples over uniformly drawn numbers 1..max_value (m_B's training data).

    ``spaced`` writes single spaces between tokens (``12 + 3 =``); ``space_jitter = j`` instead
    puts 0..j spaces before every token (the numbers, operators and ``=``), so that the model
    learns to read arithmetic whatever the spacing, as a pretrained LM does.
    """
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        terms = rng.randint(min_terms, max_terms)
        values = [rng.randint(1, max_value) for _ in range(terms)]
        ops = ["+"] + [rng.choice("+-") for _ in range(terms - 1)]
        result = sum(v if op == "+" else -v for v, op in zip(values, ops))
        if space_jitter:
            tokens = [str(values[0])] + [t for op, v in zip(ops[1:], values[1:]) for t in (op, str(v))] + ["="]
            prompt = "".join(" " * rng.randint(0, space_jitter) + t for t in tokens)
        else:
            sep = " " if spaced else ""
            prompt = _join([str(v) for v in values], ops, sep) + sep + "="
        out.append((prompt, str(result)))
    return out


def _join(items: list[str], ops: list[str], sep: str = "") -> str:
    return items[0] + "".join(sep + op + sep + item for op, item in zip(ops[1:], items[1:]))


__all__ = ["KVTable", "TASKS", "char_tokenizer", "numeric_sample"]
