"""The ``moeforge`` command line: one module per subcommand, each a thin typed wrapper over the library.

Every user error raised as :class:`~moeforge.errors.MoeforgeError` is printed as one line on
stderr, without a traceback, and the process exits with status 2.
"""

from __future__ import annotations

import contextlib
import faulthandler
import importlib
import os
import signal
import sys
import threading
from collections.abc import Iterator

import typer

from ..errors import MoeforgeError

#: subcommand modules; each defines ``register(app: typer.Typer)``.
COMMAND_MODULES = ("demo", "info", "eval", "train", "convert")


def build_app() -> typer.Typer:
    app = typer.Typer(
        name="moeforge",
        help="Turn dense LLMs into Mixture-of-Experts models, train them, evaluate and export them.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
        rich_markup_mode=None,
    )
    for name in COMMAND_MODULES:
        importlib.import_module(f"{__name__}.{name}").register(app)
    return app


INTERRUPTED = ("interrupted; finished outputs and checkpoints are kept and partial ones removed (rerun a training "
               "command to resume it from its last checkpoint).")


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM (``kill``, ``timeout``, a job scheduler) raises :class:`KeyboardInterrupt`
    as Ctrl-C does, so the cleanup that removes partial outputs runs; by default SIGTERM ends the
    process on the spot and leaves the half-written temporary directory behind."""
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield
        return

    def interrupt(_signum, _frame) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def fail(message: str, code: int = 2) -> None:
    """Print ``moeforge: error: message`` to stderr and exit with ``code``.

    Under torchrun only rank 0 prints: every process meets the same config or data error, and N
    copies of one message bury it.
    """
    if os.environ.get("RANK", "0") == "0":
        print(f"moeforge: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(signal, "SIGUSR1") and argv is None:  # `kill -USR1 PID` prints every thread's stack (a stuck run)
        faulthandler.register(signal.SIGUSR1, all_threads=True)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' per-load bars; moeforge reports its own progress
    app = build_app()
    try:
        app(args=argv, prog_name="moeforge", standalone_mode=True)
    except MoeforgeError as err:
        fail(str(err))
    except OSError as err:  # the file system said no (full disk, permissions, a vanished path)
        where = f" ({err.filename})" if getattr(err, "filename", None) else ""
        fail(f"{err.strerror or err}{where}; free disk space or fix the path and permissions, then rerun.")
    except KeyboardInterrupt:
        fail(INTERRUPTED, code=130)
    except SystemExit as exit_:
        # typer turns Ctrl-C inside a command into a silent exit 130 (Exit from KeyboardInterrupt)
        if exit_.code == 130 and isinstance(getattr(exit_.__context__, "__cause__", None), KeyboardInterrupt):
            fail(INTERRUPTED, code=130)
        raise
