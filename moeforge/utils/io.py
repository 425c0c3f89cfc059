"""File-system helpers: atomic output directories and files, safe checkpoint reading."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import socket
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..errors import MoeforgeError

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict[str, str] | None = None) -> None:
    """``safetensors.torch.save_file``, with its I/O failures (a full disk, a vanished directory)
    raised as :class:`OSError` like every other write, so callers' cleanup and messages apply:
    safetensors reports them as its own ``SafetensorError``."""
    from safetensors.torch import save_file

    with safetensors_errors_as_os_errors(path):
        save_file(tensors, str(path), metadata=metadata)


@contextlib.contextmanager
def safetensors_errors_as_os_errors(path: str | os.PathLike) -> Iterator[None]:
    """Raise a ``SafetensorError`` from the body (safetensors' report of a full disk or a vanished
    directory, also from transformers' ``save_pretrained``) as :class:`OSError` about ``path``."""
    import errno

    from safetensors import SafetensorError

    try:
        yield
    except SafetensorError as err:
        text = str(err)
        code = errno.ENOSPC if "No space left" in text else errno.EIO
        raise OSError(code, f"{os.strerror(code)} while writing safetensors ({text})", str(path)) from None


def _read_umask() -> int:
    mask = os.umask(0o022)  # the only way to read it is to set it; done once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def temp_file(directory: str | os.PathLike, prefix: str, suffix: str = "") -> str:
    """A new empty file in ``directory`` (to be renamed into place) with the mode a plain
    ``open`` would give it (``mkstemp`` makes it 0600, which would then stick to the output)."""
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=directory)
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
    finally:
        os.close(fd)
    return name


def check_writable_dir(path: str | os.PathLike, what: str = "output directory") -> None:
    """Raise :class:`MoeforgeError` unless ``path`` is a directory this process can write into,
    or could be created as one (probed with a temporary file in it or its nearest existing
    ancestor, which catches read-only mounts and immutable directories that permission bits miss)."""
    final = Path(path).expanduser()
    if final.exists() and not final.is_dir():
        raise MoeforgeError(f"{what} {final} exists and is not a directory; choose another path.")
    probe = final
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise MoeforgeError(f"{what} {final} cannot be created: {probe} is a file; choose another path.")
    try:
        os.unlink(temp_file(probe, prefix=".moeforge-probe-"))
    except OSError as err:
        raise MoeforgeError(
            f"{what} {final} is not writable ({probe}: {err.strerror or err}); choose a directory you can write to."
        ) from None


def _host() -> str:
    """This machine's name as it goes into temporary names (file-name-safe, at most 40 characters)."""
    return re.sub(r"[^A-Za-z0-9_.]", "_", socket.gethostname())[:40] or "host"


def _alive(pid: int) -> bool:
    """Whether a process ``pid`` exists on this machine (one we may not signal counts as existing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True
    return True


def owned_temp_dir(parent: str | os.PathLike, stem: str) -> Path:
    """A fresh ``.{stem}.tmp-HOST-PID-XXXX`` directory in ``parent``, named after its owner so that
    :func:`sweep_stale` can tell when the owner is gone; what killed earlier writers of ``stem``
    left there is swept first."""
    sweep_stale(parent, stem)
    return Path(tempfile.mkdtemp(prefix=f".{stem}.tmp-{_host()}-{os.getpid()}-", dir=parent))


def sweep_stale(parent: str | os.PathLike, stem: str) -> list[Path]:
    """Remove what writers of ``stem`` in ``parent`` left when they were killed (SIGKILL, power loss)
    before they could clean up: ``.{stem}.tmp-HOST-PID-*`` and ``.{stem}.old-HOST-PID`` entries whose
    HOST is this machine and whose PID no longer runs. Entries of other machines (a shared file
    system) and of running processes are left alone, so a concurrent writer never loses its
    directory; a PID reused by an unrelated process only delays the sweep. Returns what was removed."""
    host = _host()
    removed = []
    for kind in ("tmp", "old"):
        head = f".{stem}.{kind}-{host}-"
        for entry in Path(parent).glob(glob.escape(head) + "*"):
            pid = entry.name[len(head):].split("-", 1)[0]
            if not pid.isdigit() or _alive(int(pid)):
                continue
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    entry.unlink()
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_output_dir(path: str | os.PathLike, *, overwrite: bool = False) -> Iterator[Path]:
    """Yield a temporary directory beside ``path`` that becomes ``path`` only on success.

    The temporary directory lives in the same parent (so the final rename is atomic on one
    file system) and is removed if the body raises; those a killed earlier write left beside
    ``path`` are swept first (:func:`sweep_stale`). An existing ``path`` is refused unless
    ``overwrite``; then it is replaced only after the new content is complete.
    """
    if not str(path).strip():
        raise MoeforgeError("the output directory is empty (''); pass a path such as runs/my-moe.")
    final = Path(path).expanduser().resolve()
    check_writable_dir(final)  # first: a file at ``path`` is "not a directory", not "already exists"
    if final.exists() and not overwrite:
        raise MoeforgeError(
            f"output directory {final} already exists; choose another path or pass --overwrite (overwrite=True in Python) to replace it."
        )
    created = [p for p in final.parents if not p.exists()]  # innermost first
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = owned_temp_dir(final.parent, final.name)  # sweeps what a killed earlier write left
        tmp.chmod(0o777 & ~_UMASK)  # mkdtemp makes it 0700, which the renamed output would keep
    except OSError as err:
        _remove_empty(created)
        raise MoeforgeError(f"cannot write beside output directory {final}: {err.strerror or err}; choose another path.") from None
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        _remove_empty(created)  # a failed run leaves no trace, the parent folders it made included
        raise
    if final.exists():
        old = final.parent / f".{final.name}.old-{_host()}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def _remove_empty(directories: list[Path]) -> None:
    for d in directories:
        with contextlib.suppress(OSError):
            d.rmdir()


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and a rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_file(path.parent, prefix=f".{path.name}.")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str | os.PathLike, data) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def safetensors_files(directory: Path) -> list[Path]:
    """The safetensors shards of a checkpoint directory, in transformers' order of preference:
    ``model.safetensors`` when present, else the files its index names, else every ``*.safetensors``
    (a folder holding both a single file and an index is read as transformers reads it).

    Raises :class:`MoeforgeError` when the index names a missing shard.
    """
    single = directory / "model.safetensors"
    if single.is_file():  # what transformers reads; other files (e.g. Mistral's consolidated.safetensors) are not shards
        return [single]
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise MoeforgeError(f"{index} is not a valid safetensors index ({err}); re-save the checkpoint.") from None
        names = sorted(set(weight_map.values()))
        files = [directory / n for n in names]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise MoeforgeError(
                f"checkpoint {directory} is incomplete: its index names {', '.join(missing)}, which are missing."
            )
        return files
    return sorted(directory.glob("*.safetensors"))


def pickle_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.iterdir() if p.suffix in PICKLE_SUFFIXES and p.is_file())


def check_safetensors(files: list[Path]) -> None:
    """Open every shard's header; a truncated or corrupted file raises :class:`MoeforgeError`."""
    from safetensors import safe_open

    for f in files:
        try:
            with safe_open(str(f), framework="pt"):
                pass
        except Exception as err:  # safetensors raises several types for a bad header
            raise MoeforgeError(
                f"{f} is not a readable safetensors file ({err}); the file is truncated or corrupted, "
                "re-download or re-save it."
            ) from None
        _check_safetensors_length(f, f.stat().st_size)


def _check_safetensors_length(path: Path, size: int) -> None:
    """Compare the data length the header declares with the file's size."""
    import struct

    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MoeforgeError(f"{path} is truncated (no safetensors header); re-download or re-save it.")
        (n,) = struct.unpack("<Q", head)
        header = json.loads(f.read(n))
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise MoeforgeError(
            f"{path} is truncated: its header declares {8 + n + end} bytes but the file has {size}; "
            "re-download or re-save it."
        )
