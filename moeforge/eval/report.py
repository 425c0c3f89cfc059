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


def cpu_model(cpuinfo: str | None = None) -> str | None:
    """The CPU's model name from ``/proc/cpuinfo`` (Linux; ``cpuinfo`` is its text, read when None),
    or None where it cannot be read."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(errors="replace")
        except OSError:
            return None
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "model name" and value.strip():
            return " ".join(value.split())
    return None


def device_description() -> str:
    """A one-line description of the device that produced a number: the GPU's name, or the CPU's
    model, architecture, vector instruction set torch uses (AVX2, AVX512, ...) and core count. Two
    x86 CPUs can differ twofold in matmul speed, which moves ratios between matmul-bound and
    memory-bound code, so a CPU number names its CPU."""
    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}"
    import os

    arch = platform.machine() or platform.processor() or "unknown architecture"
    parts = [p for p in (cpu_model(), arch) if p]
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except (AttributeError, RuntimeError):
        capability = None
    if capability and capability != "DEFAULT":
        parts.append(capability)
    return f"CPU: {', '.join(parts)}, {os.cpu_count()} cores, torch {torch.__version__}"


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
