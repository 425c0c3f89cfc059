"""One exception type for everything a user can get wrong.

Every check on user input (configs, paths, models, data) raises :class:`MoeforgeError` with one
message that names the offending value and the fix. The CLI prints that message without a
traceback and exits with status 2; library users can catch it (it is a ``ValueError``).
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class MoeforgeError(ValueError):
    """A problem with user input. ``str(err)`` is the whole message to show."""


def closest(name: str, choices: Iterable[str], prefix: str = "") -> str:
    """A "did you mean" hint for ``name`` among ``choices`` (shown as ``prefix + choice``), or ""
    when nothing is close."""
    match = difflib.get_close_matches(name, list(choices), n=1, cutoff=0.5)
    return f" Did you mean {prefix + match[0]!r}?" if match else ""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> MoeforgeError:
    """Error for a name missing from a registry; lists the known names."""
    known = sorted(known)
    return MoeforgeError(
        f"unknown {kind} {name!r}.{closest(name, known)} Known {kind}s: {', '.join(known)}."
    )


def require(condition: bool, message: str) -> None:
    """Raise :class:`MoeforgeError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise MoeforgeError(message)


def first_line(err: BaseException) -> str:
    """The first non-empty line of an exception's message (the exception's type when it has none),
    for quoting a library's multi-line error inside one moeforge message."""
    return next((line.strip() for line in str(err).splitlines() if line.strip()), type(err).__name__)
