"""Write one experiment's table into a shared markdown report, between markers, atomically."""

from __future__ import annotations

import datetime
import platform
import re
from pathlib import Path

import torch

from ..utils.io import atomic_write_text

DEFAULT_REPORT = Path(__file__).resolve().parents[2] / "docs" / "results.md"
HEADER = "# Reproduction report\n\nEach section is written by the script it names; rerun that command to reproduce it.\n"


def device_description() -> str:
    """A one-line description of the device that produced a number."""
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    import os

    return f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"


def update_section(section_id: str, markdown: str, *, path: str | Path = DEFAULT_REPORT, title: str | None = None) -> Path:
    """Replace (or append) the section ``section_id`` of the report with ``markdown``.

    The section is delimited by ``<!-- BEGIN section_id -->`` / ``<!-- END section_id -->``;
    sections written by other scripts are left untouched. The date is stamped automatically.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else HEADER
    stamp = datetime.date.today().isoformat()
    body = markdown.rstrip() + f"\n\n_Written {stamp}._\n"
    if title:
        body = f"## {title}\n\n" + body
    block = f"<!-- BEGIN {section_id} -->\n{body}<!-- END {section_id} -->"
    pattern = re.compile(rf"<!-- BEGIN {re.escape(section_id)} -->.*?<!-- END {re.escape(section_id)} -->", re.S)
    if pattern.search(text):
        text = pattern.sub(lambda _: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    atomic_write_text(path, text)
    return path
