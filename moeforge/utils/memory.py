"""CPU allocator tuning for training and benchmarks.

glibc returns every freed block above its mmap threshold (at most 32 MiB, dynamically) to the
operating system, so a training step that allocates the same large activations, gradients and
logits every iteration page-faults all of them back in each time: zero-filling a 113 MB
embedding gradient then runs at ~0.4 GB/s instead of memory speed. Raising the mmap and trim
thresholds keeps freed blocks in the heap for reuse, the effect users otherwise get by
preloading jemalloc or tcmalloc. The setting applies to the whole process and only to glibc;
set ``MOEFORGE_MALLOC_TUNING=0`` to leave the allocator alone.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import threading

import torch

_workspace = threading.local()


def workspace(rows: int, cols: int, like: torch.Tensor, slot: str = "scratch") -> torch.Tensor:
    """A (rows, cols) scratch tensor reused across calls on this thread (grown when too small).

    Large temporaries allocated afresh are page-faulted in on every call on CPU (glibc serves them
    with mmap and returns them on free); a reused block is faulted in once. The caller must be
    done with the block before the next call on the same thread asks for the same ``slot``;
    different slots are different blocks.
    """
    key = (like.device, like.dtype, slot)
    cache = getattr(_workspace, "buffers", None)
    if cache is None:
        cache = _workspace.buffers = {}
    buf = cache.get(key)
    need = rows * cols
    if buf is None or buf.numel() < need:
        # a normal tensor even when first asked for under inference_mode: an inference tensor could
        # not be written by a later call outside it
        with torch.inference_mode(False):
            buf = torch.empty(need, device=like.device, dtype=like.dtype)
        cache[key] = buf
    return buf[:need].view(rows, cols)


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """The C library, looked up once (``find_library`` runs a subprocess), or None where absent."""
    name = ctypes.util.find_library("c")
    if name is None:
        return None
    try:
        return ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_done = False


def tune_cpu_allocator(threshold_bytes: int = 1 << 30) -> bool:
    """Keep freed blocks up to ``threshold_bytes`` in the heap (glibc only). Returns True if applied."""
    global _done
    if _done:
        return True
    if os.environ.get("MOEFORGE_MALLOC_TUNING", "1").lower() in ("0", "off", "false", "no"):
        return False
    mallopt = getattr(_libc(), "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    ok = mallopt(_M_MMAP_THRESHOLD, min(threshold_bytes, 2**31 - 1)) == 1
    ok = mallopt(_M_TRIM_THRESHOLD, min(2 * threshold_bytes, 2**31 - 1)) == 1 and ok
    _done = ok
    return ok


_MADV_DONTNEED = 4


def release_file_pages(directory: str | os.PathLike) -> int:
    """Unmap the resident pages of read-only file mappings of files under ``directory`` (Linux only).

    safetensors files are memory-mapped; every page a reader touches stays in the process's
    resident set until the whole mapping goes, even after the tensors read from it are freed.
    ``madvise(MADV_DONTNEED)`` drops those pages from this process (they stay in the kernel's page
    cache and fault back in from the file if touched again), so a reader that walks a large file
    piece by piece keeps the resident memory of the piece it is on. Shared writable mappings are
    left alone; private ones (torch maps safetensors copy-on-write) lose any page written in place,
    so call this only on files that are read, never modified through their tensors. Returns the
    bytes of mappings advised (0 where unsupported).
    """
    root = os.path.realpath(directory) + os.sep
    madvise = getattr(_libc(), "madvise", None)
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    if madvise is None:
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    advised = 0
    for line in lines:
        parts = line.split(maxsplit=5)
        if len(parts) < 6 or parts[1][1:4:2] == "ws" or not parts[5].startswith(root):
            continue
        start, end = (int(x, 16) for x in parts[0].split("-"))
        if madvise(start, end - start, _MADV_DONTNEED) == 0:
            advised += end - start
    return advised


def trim_heap() -> bool:
    """Return the heap's free memory to the operating system (glibc ``malloc_trim``; no-op elsewhere).

    After a long streaming phase the heap holds freed blocks scattered among live ones; a phase
    that follows starts from the lower resident size. Returns True if memory was released.
    """
    malloc_trim = getattr(_libc(), "malloc_trim", None)
    if malloc_trim is None:
        return False
    malloc_trim.argtypes = [ctypes.c_size_t]
    return bool(malloc_trim(0))
