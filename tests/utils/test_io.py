"""Atomic outputs: what a killed writer left is swept by the next write, and only that."""

import os
import signal
import subprocess
import sys

import pytest

from moeforge.errors import MoeforgeError
from moeforge.utils import io

KILLED_WRITER = """
import sys, time
from moeforge.utils.io import atomic_output_dir
with atomic_output_dir(sys.argv[1]) as tmp:
    (tmp / "part.safetensors").write_bytes(b"x" * 1000)
    print(tmp, flush=True)
    time.sleep(60)
"""


def _killed_writer(out):
    """Start a real writer of ``out``, SIGKILL it mid-write; returns the temporary directory it left."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, str(out)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": os.getcwd()})
    left = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return left


def test_a_killed_writers_temporary_directory_is_swept_by_the_next_write(tmp_path):
    out = tmp_path / "moe"
    left = _killed_writer(out)
    assert left and os.path.isdir(left) and not out.exists()
    with io.atomic_output_dir(out) as tmp:
        (tmp / "config.json").write_text("{}")
    assert not os.path.exists(left)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe"]


def test_live_writers_other_machines_and_other_outputs_are_left_alone(tmp_path):
    mine_alive = io.owned_temp_dir(tmp_path, "moe")  # this process: alive
    other_host = tmp_path / f".moe.tmp-{io._host()}x-1-abc"  # another machine on a shared file system
    other_output = tmp_path / f".moe2.tmp-{io._host()}-{_dead_pid()}-abc"
    unowned = tmp_path / ".moe.tmp-abc"  # the old naming: no owner to check
    for d in (other_host, other_output, unowned):
        d.mkdir()
    assert io.sweep_stale(tmp_path, "moe") == []
    dead = tmp_path / f".moe.tmp-{io._host()}-{_dead_pid()}-abc"
    dead.mkdir()
    old = tmp_path / f".moe.old-{io._host()}-{_dead_pid()}"
    old.mkdir()
    assert sorted(io.sweep_stale(tmp_path, "moe")) == sorted([dead, old])
    for d in (mine_alive, other_host, other_output, unowned):
        assert d.is_dir()


def test_a_refused_output_sweeps_nothing(tmp_path):
    (tmp_path / "moe").mkdir()
    dead = tmp_path / f".moe.tmp-{io._host()}-{_dead_pid()}-abc"
    dead.mkdir()
    with pytest.raises(MoeforgeError, match="already exists"):
        with io.atomic_output_dir(tmp_path / "moe"):
            pass
    assert dead.is_dir()


def _dead_pid():
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid  # reaped: no such process now (reuse within a test is vanishingly unlikely)
