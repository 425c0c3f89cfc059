"""Tensor-by-tensor safetensors reading and writing, so conversion memory stays near one layer.

Reading does not memory-map: :class:`SafetensorsReader` parses each shard's header once and
reads one tensor's bytes straight into a freshly allocated tensor (``readinto``), so the
process only ever holds the tensors the converter is working on (a memory map would keep every
touched page of a 13 GB checkpoint in the resident set).

Writing is planned: :class:`ShardedWriter` is given the full list of (key, shape, dtype) up
front, cuts it into shards of at most ``max_shard_bytes``, writes each shard's header when its
first tensor arrives and then appends tensor bytes in plan order. Nothing is buffered beyond
the tensor being written. Every tensor's CRC-32 (zlib, ~1.5 GB/s) is recorded so the export can
be re-read and checked (:meth:`ShardedWriter.verify_digests`); this guards against disk and
write errors, not against deliberate tampering.

The safetensors layout (https://github.com/huggingface/safetensors): 8-byte little-endian header
length N, N bytes of JSON ``{key: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__":
{...}}`` padded with spaces to a multiple of 8, then the data, offsets relative to its start.
"""

from __future__ import annotations

import json
import math
import os
import struct
import zlib
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import MoeforgeError

#: safetensors dtype names <-> torch dtypes
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def tensor_bytes(shape: Iterable[int], dtype: torch.dtype) -> int:
    return _numel(shape) * torch.empty((), dtype=dtype).element_size()


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives: file, absolute byte offset, shape, dtype."""

    path: Path
    offset: int
    nbytes: int
    shape: tuple[int, ...]
    dtype: torch.dtype


_CRC_CHUNK = 16 << 20


def read_header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header; return (header dict, absolute offset of the data section).

    Raises :class:`MoeforgeError` naming the file when it is truncated or not safetensors.
    """
    size = path.stat().st_size
    fix = "the file is truncated or corrupted; re-download or re-save it"
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise MoeforgeError(f"{path} is not a readable safetensors file (no header); {fix}.")
        (n,) = struct.unpack("<Q", head)
        if n > size - 8 or n > 100_000_000:
            raise MoeforgeError(f"{path} is not a readable safetensors file (header length {n}); {fix}.")
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MoeforgeError(f"{path} is not a readable safetensors file (bad header: {err}); {fix}.") from None
    if not isinstance(header, dict):
        raise MoeforgeError(f"{path} is not a readable safetensors file (header is not an object); {fix}.")
    data_start = 8 + n
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            begin, stop = entry["data_offsets"]
            dtype = ST_DTYPES[entry["dtype"]]
            shape = tuple(int(s) for s in entry["shape"])
        except (KeyError, TypeError, ValueError):
            raise MoeforgeError(f"{path}: tensor {key!r} has an unreadable header entry; {fix}.") from None
        if stop - begin != tensor_bytes(shape, dtype) or begin < 0:
            raise MoeforgeError(f"{path}: tensor {key!r} declares {stop - begin} bytes for shape {shape}; {fix}.")
        end = max(end, stop)
    if data_start + end > size:
        raise MoeforgeError(
            f"{path} is truncated: its header declares {data_start + end} bytes but the file has {size}; "
            "re-download or re-save it."
        )
    return header, data_start


class SafetensorsReader:
    """Random access to the tensors of one or more safetensors files without memory-mapping them.

    ``get(key)`` returns a new tensor owned by the caller (in the stored dtype); nothing is cached.
    """

    def __init__(self, files: list[Path]) -> None:
        self.files = list(files)
        self.index: dict[str, TensorInfo] = {}
        for path in self.files:
            header, data_start = read_header(path)
            for key, entry in header.items():
                if key == "__metadata__":
                    continue
                if key in self.index:
                    raise MoeforgeError(f"tensor {key!r} appears in both {self.index[key].path.name} and {path.name}.")
                begin, stop = entry["data_offsets"]
                self.index[key] = TensorInfo(
                    path, data_start + begin, stop - begin, tuple(entry["shape"]), ST_DTYPES[entry["dtype"]]
                )
        self._handles: dict[Path, object] = {}

    def keys(self) -> set[str]:
        return set(self.index)

    def __contains__(self, key: str) -> bool:
        return key in self.index

    def info(self, key: str) -> TensorInfo:
        return self.index[key]

    def _seek(self, info: TensorInfo):
        f = self._handles.get(info.path)
        if f is None:
            f = self._handles[info.path] = open(info.path, "rb")  # noqa: SIM115  closed in close()
        f.seek(info.offset)
        return f

    def get(self, key: str) -> torch.Tensor:
        info = self.index[key]
        out = torch.empty(info.shape, dtype=info.dtype)
        if info.nbytes == 0:
            return out
        f = self._seek(info)
        view = memoryview(out.view(-1).view(torch.uint8).numpy())
        got = f.readinto(view)
        if got != info.nbytes:
            raise MoeforgeError(f"{info.path} ended while reading tensor {key!r}; the file is truncated.")
        return out

    def crc32(self, key: str, buffer: bytearray) -> int:
        """CRC-32 of a tensor's bytes, streamed from its file through ``buffer`` (no tensor is allocated)."""
        info = self.index[key]
        crc, left = 0, info.nbytes
        f = self._seek(info)
        view = memoryview(buffer)
        while left:
            got = f.readinto(view[: min(left, len(buffer))])
            if not got:
                raise MoeforgeError(f"{info.path} ended while reading tensor {key!r}; the file is truncated.")
            crc = zlib.crc32(view[:got], crc)
            left -= got
        return crc

    def close(self) -> None:
        for f in self._handles.values():
            f.close()
        self._handles.clear()

    def __enter__(self) -> SafetensorsReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


@dataclass(frozen=True)
class PlanEntry:
    key: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return tensor_bytes(self.shape, self.dtype)


def parse_size(size: int | str) -> int:
    """'2GB', '500MB', '1.5GiB', '500000' (bytes) or an int -> a positive number of bytes.

    Raises :class:`MoeforgeError` for anything else, zero and negative sizes included.
    """
    if isinstance(size, int) and not isinstance(size, bool):
        value: float = size
    else:
        text = str(size).strip().upper().replace(" ", "")
        units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9, "B": 1}
        unit = next((u for u in units if text.endswith(u)), "")
        try:
            value = float(text[: len(text) - len(unit)]) * units.get(unit, 1)
        except ValueError:
            value = math.nan
    if not (math.isfinite(value) and value >= 1):
        raise MoeforgeError(
            f"cannot read size {size!r} as a shard size; write a positive size like '2GB', '500MB' or a number of bytes."
        )
    return int(value)


class ShardedWriter:
    """Write a planned list of tensors into sharded safetensors files, one tensor at a time.

    Args:
        directory: output directory (exists).
        plan: every tensor that will be written, in write order.
        max_shard_bytes: a shard is closed before it would exceed this (a single larger tensor
            gets a shard of its own).
        metadata: ``__metadata__`` of every shard (``{"format": "pt"}`` is always set).

    ``write(key, tensor)`` must follow the plan's order; shape and dtype are checked. ``close()``
    checks that everything was written and writes ``model.safetensors.index.json`` when there is
    more than one shard (one shard is named ``model.safetensors``).
    """

    def __init__(
        self, directory: Path, plan: list[PlanEntry], *, max_shard_bytes: int = 2 * 10**9, metadata: dict | None = None
    ) -> None:
        self.directory = Path(directory)
        self.plan = plan
        keys = [e.key for e in plan]
        if len(set(keys)) != len(keys):
            dup = sorted({k for k in keys if keys.count(k) > 1})
            raise ValueError(f"duplicate keys in the write plan: {dup[:5]}")
        self.metadata = {"format": "pt", **(metadata or {})}
        self.shards: list[list[PlanEntry]] = []
        current: list[PlanEntry] = []
        size = 0
        for entry in plan:
            if current and size + entry.nbytes > max_shard_bytes:
                self.shards.append(current)
                current, size = [], 0
            current.append(entry)
            size += entry.nbytes
        if current or not self.shards:
            self.shards.append(current)
        n = len(self.shards)
        self.names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        self._position = 0  # index into plan
        self._shard = -1
        self._file = None
        self._shard_end = 0
        self.digests: dict[str, int] = {}
        self.total_bytes = sum(e.nbytes for e in plan)
        self.bytes_written = 0

    # -------------------------------------------------------------- writing
    def _open_next_shard(self) -> None:
        self._close_file()
        self._shard += 1
        entries = self.shards[self._shard]
        header: dict = {"__metadata__": self.metadata}
        offset = 0
        for e in entries:
            header[e.key] = {"dtype": TORCH_TO_ST[e.dtype], "shape": list(e.shape), "data_offsets": [offset, offset + e.nbytes]}
            offset += e.nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * ((8 - len(raw) % 8) % 8)
        self._file = open(self.directory / self.names[self._shard], "wb")  # noqa: SIM115  closed in _close_file
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self._shard_end += len(entries)

    def _close_file(self) -> None:
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None

    @property
    def next_key(self) -> str | None:
        return self.plan[self._position].key if self._position < len(self.plan) else None

    def write(self, key: str, tensor: torch.Tensor) -> None:
        if self._position >= len(self.plan):
            raise RuntimeError(f"write plan exhausted; unexpected tensor {key!r}")
        entry = self.plan[self._position]
        if key != entry.key:
            raise RuntimeError(f"write order: expected {entry.key!r}, got {key!r}")
        if tuple(tensor.shape) != entry.shape or tensor.dtype != entry.dtype:
            raise RuntimeError(
                f"tensor {key!r}: planned {entry.shape} {entry.dtype}, got {tuple(tensor.shape)} {tensor.dtype}"
            )
        if self._position >= self._shard_end:
            self._open_next_shard()
        data = tensor.detach().contiguous().view(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self.digests[key] = zlib.crc32(memoryview(data))
        self.bytes_written += entry.nbytes
        self._position += 1

    def close(self) -> list[Path]:
        """Finish the last shard and write the index; return the shard paths."""
        if self._position != len(self.plan):
            raise RuntimeError(f"write plan incomplete: next expected tensor {self.next_key!r}")
        if self._shard < 0:  # empty plan
            self._open_next_shard()
        self._close_file()
        paths = [self.directory / n for n in self.names]
        if len(self.names) > 1:
            weight_map = {e.key: self.names[s] for s, entries in enumerate(self.shards) for e in entries}
            index = {"metadata": {"total_size": self.total_bytes}, "weight_map": weight_map}
            (self.directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        return paths

    def abort(self) -> None:
        self._close_file()

    # -------------------------------------------------------------- checking
    def verify_digests(self) -> int:
        """Re-read every written tensor and compare its bytes with the digest taken when writing.

        Returns the number of tensors checked; raises :class:`MoeforgeError` on the first mismatch.
        """
        reader = SafetensorsReader([self.directory / n for n in self.names])
        # one reused block, no larger than the largest tensor: no per-tensor allocations to fragment the heap
        buffer = bytearray(max(1, min(_CRC_CHUNK, max((e.nbytes for e in self.plan), default=1))))
        try:
            for entry in self.plan:
                if entry.key not in reader:
                    raise MoeforgeError(f"export verification failed: tensor {entry.key!r} is missing from the written files.")
                info = reader.info(entry.key)
                if info.shape != entry.shape or info.dtype != entry.dtype:
                    raise MoeforgeError(
                        f"export verification failed: tensor {entry.key!r} was written as {info.shape} {info.dtype}, "
                        f"planned {entry.shape} {entry.dtype}."
                    )
                if reader.crc32(entry.key, buffer) != self.digests[entry.key]:
                    raise MoeforgeError(
                        f"export verification failed: the bytes of tensor {entry.key!r} on disk differ from what was "
                        "written (disk error or a concurrent writer); the export was discarded."
                    )
        finally:
            reader.close()
        return len(self.plan)
