"""Built-in text domains that exist on every Python installation (no download, no data folder).

* ``prose``: English reference prose, the language-reference topics of ``pydoc_data.topics``.
* ``code``: the Python standard library's own top-level ``.py`` files.
* ``arithmetic``: synthetic integer arithmetic lines (``17 + 25 = 42``), seeded.

Each domain is a list of documents; :func:`builtin_documents` splits them deterministically into
``train`` and ``valid`` (every 5th document, by sorted name, is held out).
"""

from __future__ import annotations

import random
import sysconfig
from pathlib import Path

from ..errors import unknown_name

HOLDOUT_EVERY = 5


def _prose() -> list[tuple[str, str]]:
    import pydoc_data.topics as topics

    return sorted(topics.topics.items())


def _code() -> list[tuple[str, str]]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = []
    for path in sorted(stdlib.glob("*.py")):
        try:
            docs.append((path.name, path.read_text(encoding="utf-8")))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def arithmetic_lines(count: int, seed: int = 0, max_value: int = 999) -> list[str]:
    """``count`` lines "a op b = c" with op in +, -, * (products kept to two-digit factors)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(count):
        op = rng.choice("+-*")
        if op == "*":
            a, b = rng.randint(2, 99), rng.randint(2, 99)
            c = a * b
        else:
            a, b = rng.randint(0, max_value), rng.randint(0, max_value)
            c = a + b if op == "+" else a - b
        lines.append(f"{a} {op} {b} = {c}")
    return lines


def _arithmetic() -> list[tuple[str, str]]:
    return [(f"arith-{i:03d}", "\n".join(arithmetic_lines(200, seed=i)) + "\n") for i in range(100)]


BUILTIN_DOMAINS = {"prose": _prose, "code": _code, "arithmetic": _arithmetic}


def builtin_documents(name: str, split: str = "train") -> list[str]:
    """Documents of a built-in domain; ``split`` is "train", "valid" or "all"."""
    if name not in BUILTIN_DOMAINS:
        raise unknown_name("built-in domain", name, BUILTIN_DOMAINS)
    if split not in ("train", "valid", "all"):
        raise ValueError(f"split must be train, valid or all, got {split!r}")
    docs = BUILTIN_DOMAINS[name]()
    if split == "all":
        return [text for _, text in docs]
    keep_valid = split == "valid"
    return [text for i, (_, text) in enumerate(docs) if (i % HOLDOUT_EVERY == HOLDOUT_EVERY - 1) == keep_valid]


def builtin_text(name: str, split: str = "train") -> str:
    """A domain's documents of one split joined by blank lines."""
    return "\n\n".join(builtin_documents(name, split))
