"""Evaluation corpora by name or path: built-in domains, WikiText-2, GSM8K, user files.

Names (see :data:`CORPUS_NAMES`):

* ``prose``, ``code``, ``arithmetic``: the held-out (``valid``) split of the built-in domains
  (:mod:`moeforge.data.builtin`); present on every machine.
* ``wikitext2``: WikiText-2's test split (``wikitext-2/test.txt``), the text SmolLM2's reference
  perplexity (29.6 on the first 8,192 tokens) is measured on.
* ``gsm8k``: GSM8K's test split (``gsm8k/test.jsonl``), each problem rendered
  ``question\\nanswer``.

The benchmark files live in a data folder that users do not have: ``$MOEFORGE_DATA`` when set,
else ``../shared/data`` beside the repository checkout. A path (``.txt``, ``.md``, ``.jsonl``,
``.json``) is read as a user corpus; JSONL records contribute their ``text`` field, else
``question``/``answer``, else the contents of ``messages``/``conversations``.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..data.builtin import BUILTIN_DOMAINS, builtin_documents
from ..errors import MoeforgeError, closest

#: corpora found in the benchmark data folder: name -> (relative file, reader)
BENCHMARK_FILES = {"wikitext2": "wikitext-2/test.txt", "gsm8k": "gsm8k/test.jsonl"}
ALIASES = {"wikitext-2": "wikitext2", "wikitext": "wikitext2", "wiki": "wikitext2"}
CORPUS_NAMES = (*BUILTIN_DOMAINS, *BENCHMARK_FILES)
TEXT_SUFFIXES = (".txt", ".md", ".text")
JSON_SUFFIXES = (".jsonl", ".json")


@dataclass(frozen=True)
class EvalCorpus:
    """A named evaluation text.

    Attributes:
        name: the key reports use (``prose``, ``wikitext2``, or a file's stem).
        documents: the documents, in order; perplexity joins them with blank lines.
        source: where the text came from, for reports.
    """

    name: str
    documents: tuple[str, ...]
    source: str

    @property
    def text(self) -> str:
        return "\n\n".join(self.documents)


def data_root() -> Path:
    """The benchmark data folder: ``$MOEFORGE_DATA``, else ``<repo>/../shared/data``."""
    env = os.environ.get("MOEFORGE_DATA")
    if env:
        return Path(env).expanduser()
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"


def available_benchmarks(root: Path | None = None) -> list[str]:
    """Benchmark corpus names whose files exist under ``root``."""
    root = data_root() if root is None else Path(root)
    return [name for name, rel in BENCHMARK_FILES.items() if (root / rel).is_file()]


def default_corpora(root: Path | None = None) -> list[str]:
    """The built-in domains, then every benchmark corpus found in the data folder."""
    return [*BUILTIN_DOMAINS, *available_benchmarks(root)]


def _record_text(record: dict, where: str) -> str:
    if not isinstance(record, dict):
        raise MoeforgeError(f"{where}: expected a JSON object per record, got {type(record).__name__}.")
    if isinstance(record.get("text"), str):
        return record["text"]
    if isinstance(record.get("question"), str) and isinstance(record.get("answer"), str):
        return record["question"] + "\n" + record["answer"]
    for key in ("messages", "conversations"):
        turns = record.get(key)
        if isinstance(turns, list):
            parts = [t.get("content", t.get("value", "")) for t in turns if isinstance(t, dict)]
            if any(parts):
                return "\n".join(p for p in parts if isinstance(p, str))
    raise MoeforgeError(
        f"{where}: a record has none of the fields moeforge reads (text; question+answer; messages; "
        f"conversations); its keys are {sorted(record)}."
    )


def json_records(path: Path, raw: str, limit: int | None = None) -> list[tuple[object, str]]:
    """(record, where) pairs of a JSON Lines text, or of a ``.json`` file holding one JSON document
    (a record or a list of records), up to ``limit``; ``where`` names the file and line for messages."""
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(raw)
        except json.JSONDecodeError:
            data = None
        if data is not None:
            items = data if isinstance(data, list) else [data]
            return [(r, f"{path} record {i}") for i, r in enumerate(items[:limit], 1)]
    out: list[tuple[object, str]] = []
    for lineno, line in enumerate(raw.splitlines(), 1):
        if limit is not None and len(out) >= limit:
            break
        if not line.strip():
            continue
        try:
            out.append((json.loads(line), f"{path}:{lineno}"))
        except json.JSONDecodeError as err:
            what = "a JSON document nor JSON Lines" if path.suffix.lower() == ".json" else "valid JSON"
            raise MoeforgeError(f"{path}:{lineno} is not {what} ({err}); one JSON object per line.") from None
    return out


def read_corpus_file(path: Path, name: str | None = None) -> EvalCorpus:
    """Read a text or JSON(L) file as an :class:`EvalCorpus`; empty or unreadable files raise."""
    path = Path(path).expanduser()
    name = name or path.stem
    if path.is_dir():
        raise MoeforgeError(f"corpus {path} is a directory; pass a .txt or .jsonl file inside it, or a corpus name.")
    if not path.is_file():
        raise MoeforgeError(f"corpus file {path} does not exist; pass an existing .txt or .jsonl file or a corpus name.")
    try:
        raw = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Windows editors) is not text
    except UnicodeDecodeError:
        raise MoeforgeError(f"corpus file {path} is not UTF-8 text; pass a .txt or .jsonl file.") from None
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        docs = [_record_text(r, where) for r, where in json_records(path, raw)]
    elif suffix in TEXT_SUFFIXES or suffix == "":
        docs = [raw]
    else:
        raise MoeforgeError(
            f"corpus file {path} has suffix {suffix!r}; moeforge reads {', '.join(TEXT_SUFFIXES + JSON_SUFFIXES)}."
        )
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise MoeforgeError(f"corpus file {path} holds no text.")
    return EvalCorpus(name, tuple(docs), str(path))


def resolve_corpus(name_or_path: str, root: Path | None = None) -> EvalCorpus:
    """An :class:`EvalCorpus` from a corpus name (:data:`CORPUS_NAMES`) or a file path."""
    key = ALIASES.get(name_or_path.lower(), name_or_path.lower())
    if key in BUILTIN_DOMAINS:
        return EvalCorpus(key, tuple(builtin_documents(key, "valid")), f"built-in {key} (valid split)")
    if key in BENCHMARK_FILES:
        root = data_root() if root is None else Path(root)
        path = root / BENCHMARK_FILES[key]
        if not path.is_file():
            raise MoeforgeError(
                f"corpus {key!r} needs {path}, which does not exist; point $MOEFORGE_DATA at a folder holding "
                f"{BENCHMARK_FILES[key]}, or pass a file path."
            )
        corpus = read_corpus_file(path, key)
        if key == "wikitext2":  # one document, as the standard protocol joins the split with newlines
            return EvalCorpus(key, (corpus.documents[0],), str(path))
        return corpus
    path = Path(name_or_path).expanduser()
    if path.exists() or any(sep in name_or_path for sep in ("/", os.sep)) or path.suffix:
        return read_corpus_file(path)
    raise MoeforgeError(
        f"unknown corpus {name_or_path!r}.{closest(key, CORPUS_NAMES)} Known corpora: {', '.join(CORPUS_NAMES)}; "
        "or pass a path to a .txt or .jsonl file."
    )


def tokenize_corpus(tokenizer, corpus: EvalCorpus, max_tokens: int | None = None):
    """(N,) long tensor of the corpus's token ids, cut to ``max_tokens``.

    Only a prefix of the text long enough for ``max_tokens`` is tokenised (grown until it
    suffices), so asking for 4,096 tokens of a long corpus stays fast.
    """
    import torch

    text = corpus.text
    if max_tokens is None:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        return torch.tensor(ids, dtype=torch.long)
    chars = max(1024, 8 * max_tokens)
    while True:
        piece = text[:chars]
        ids = tokenizer(piece, add_special_tokens=False).input_ids
        if len(ids) > max_tokens or chars >= len(text):
            break
        chars *= 2
    return torch.tensor(ids[:max_tokens], dtype=torch.long)
