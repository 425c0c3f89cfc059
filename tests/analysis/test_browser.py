"""The token-routing HTML page rendered in a real browser (headless Chromium), when one is installed.

Debian's ``chromium`` package is on the project's CI machine; elsewhere the test is skipped
(``apt-get install -y chromium`` to run it).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
BROWSER = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)


@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install -y chromium)")
def test_routing_page_renders_in_chromium(tmp_path):
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "check_routing_html.py"), "--out", str(tmp_path)],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    assert "OK:" in run.stdout and "expert colours painted" in run.stdout
    shot = tmp_path / "routing_demo.png"
    assert shot.is_file() and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.skipif(BROWSER is None, reason="no Chromium installed (apt-get install -y chromium)")
def test_broken_page_fails_the_check(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<html><body><p>no routing grid here</p></body></html>")
    run = subprocess.run([sys.executable, str(REPO / "scripts" / "check_routing_html.py"), "--html", str(page),
                          "--out", str(tmp_path / "out")], capture_output=True, text=True, timeout=300)
    assert run.returncode != 0
    assert "did not run" in (run.stdout + run.stderr)
