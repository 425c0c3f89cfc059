"""Build every domain of a training config: read, tokenize, pack, hold out validation, cache on disk.

The cache key covers the source's content fingerprint (file paths, sizes and SHA-256 digests,
or the built-in domain with the Python and moeforge versions), every setting that changes the tokens (format, fields, system
prompt, token limits, packing) and the tokenizer itself (its vocabulary and merges, special
tokens, chat template). Entries are ``.npy`` files (read with ``allow_pickle=False``) written to a
temporary directory and renamed into place, so an interrupted build leaves nothing half-written;
an entry whose files do not match its ``meta.json`` is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..errors import MoeforgeError
from ..utils.io import owned_temp_dir
from .packing import Blocks, holdout, pack_chat, pack_text
from .sources import read_source, source_fingerprint

logger = logging.getLogger(__name__)

#: bump when packing changes the tokens it produces
PACKING_VERSION = 3


@dataclass
class DomainData:
    """One domain's packed blocks: ``train`` and (optionally) ``valid``."""

    name: str
    kind: str
    train: Blocks
    valid: Blocks | None
    skipped: int = 0
    """Chat examples dropped because truncation to seq_len left no assistant token."""
    cached: bool = False
    train_digest: str = ""
    """:meth:`Blocks.digest` of ``train``, taken when the blocks were built (a checkpoint records it,
    so a resume can tell that the training data changed)."""

    def __post_init__(self) -> None:
        if not self.train_digest:
            self.train_digest = self.train.digest()


def cache_root(cache_dir: str | None) -> Path | None:
    """The token cache directory, or None when caching is off."""
    if cache_dir is not None:
        return None if cache_dir.lower() in ("off", "none", "0", "false") else Path(cache_dir).expanduser()
    root = os.environ.get("MOEFORGE_CACHE", "")
    if root.lower() in ("off", "0", "none", "false"):
        return None
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "moeforge") / "tokens"


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of everything about a tokenizer that changes token ids."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(str(len(tokenizer)).encode())
    h.update(json.dumps(tokenizer.special_tokens_map, sort_keys=True, default=str).encode())
    h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        h.update(backend.to_str().encode())
    else:  # slow tokenizers: the vocabulary
        h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    return h.hexdigest()[:16]


def separator_id(tokenizer, separator: str | None) -> int:
    """Id of the document separator: ``separator`` (a token string) or the tokenizer's EOS."""
    if separator is None:
        if tokenizer.eos_token_id is None:
            raise MoeforgeError("the tokenizer has no EOS token to separate packed documents; set `separator:` to a token.")
        return int(tokenizer.eos_token_id)
    ids = tokenizer.convert_tokens_to_ids([separator])
    unk = tokenizer.unk_token_id
    if not ids or ids[0] is None or (unk is not None and ids[0] == unk and separator != tokenizer.unk_token):
        raise MoeforgeError(f"separator {separator!r} is not a token of the tokenizer; use one of its special tokens.")
    return int(ids[0])


def _save(directory: Path, dom: DomainData) -> None:
    for split in ("train", "valid"):
        blocks = getattr(dom, split)
        if blocks is None:
            continue
        np.save(directory / f"{split}_ids.npy", blocks.input_ids)
        np.save(directory / f"{split}_lengths.npy", blocks.lengths)
        if blocks.labels is not None:
            np.save(directory / f"{split}_labels.npy", blocks.labels)
    # what was written, so a load can tell a complete entry from one with a file missing or swapped
    splits = {
        split: {"blocks": len(blocks), "seq_len": blocks.seq_len, "labels": blocks.labels is not None}
        for split in ("train", "valid")
        if (blocks := getattr(dom, split)) is not None
    }
    meta = {"kind": dom.kind, "skipped": dom.skipped, "splits": splits, "train_digest": dom.train_digest}
    (directory / "meta.json").write_text(json.dumps(meta) + "\n")


def _load(directory: Path, name: str) -> DomainData | None:
    meta_file = directory / "meta.json"
    if not meta_file.is_file():
        return None
    try:
        meta = json.loads(meta_file.read_text())
        splits = {"train": None, "valid": None}
        for split, info in meta["splits"].items():
            labels_file = directory / f"{split}_labels.npy"
            # memory-mapped: a large corpus is paged in as batches touch it, not read whole
            blocks = Blocks(
                np.load(directory / f"{split}_ids.npy", allow_pickle=False, mmap_mode="r"),
                np.load(directory / f"{split}_lengths.npy", allow_pickle=False),
                np.load(labels_file, allow_pickle=False, mmap_mode="r") if info["labels"] else None,
            )
            shape = (info["blocks"], info["seq_len"])
            if (
                split not in splits
                or blocks.input_ids.shape != shape
                or blocks.lengths.shape != shape[:1]
                or (blocks.labels is not None and blocks.labels.shape != shape)
            ):
                return None
            splits[split] = blocks
        if splits["train"] is None:
            return None
        dom = DomainData(name, meta["kind"], splits["train"], splits["valid"], int(meta.get("skipped", 0)), cached=True,
                         train_digest=str(meta.get("train_digest") or ""))
    except (OSError, ValueError, TypeError, KeyError, AttributeError, json.JSONDecodeError):
        return None  # a damaged entry (or one from before the file list) is rebuilt
    return dom


def _tokenize_records(tokenizer, kind, records, *, source, seq_len, sep, pad, max_tokens):
    if kind == "chat":
        pack = bool(source.pack)
        return pack_chat(tokenizer, records, seq_len=seq_len, pad_id=pad, pack=pack, max_tokens=max_tokens)
    return pack_text(tokenizer, records, seq_len=seq_len, separator_id=sep, max_tokens=max_tokens), 0


def build_domain(
    source,
    tokenizer,
    *,
    seq_len: int,
    separator: str | None = None,
    cache_dir: str | None = None,
    valid_max_tokens: int | None = None,
    tokenizer_digest: str | None = None,
) -> DomainData:
    """Packed train/valid blocks of one :class:`~moeforge.train.config.DataSource` (cached)."""
    sep = separator_id(tokenizer, separator)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else sep
    root = cache_root(cache_dir)
    entry = None
    if root is not None:
        key_data = {
            "v": PACKING_VERSION,
            "source": {k: v for k, v in asdict(source).items() if k not in ("weight", "name")},
            "content": source_fingerprint(source),
            "tokenizer": tokenizer_digest or tokenizer_fingerprint(tokenizer),
            "seq_len": seq_len,
            "sep": sep,
            "pad": pad,
            "valid_max_tokens": valid_max_tokens,
        }
        key = hashlib.sha256(json.dumps(key_data, sort_keys=True, default=str).encode()).hexdigest()[:24]
        entry = root / f"{source.name}-{key}"
        hit = _load(entry, source.name)
        if hit is not None:
            return hit
        if entry.exists():  # damaged or incomplete: rebuild it
            shutil.rmtree(entry, ignore_errors=True)
    kind, train_records, valid_records = read_source(source)
    train, skipped = _tokenize_records(
        tokenizer, kind, train_records, source=source, seq_len=seq_len, sep=sep, pad=pad, max_tokens=source.max_tokens
    )
    if len(train) == 0:
        raise MoeforgeError(
            f"data source {source.name!r} yields no training blocks"
            + (f" ({skipped} chat examples had no assistant token within seq_len={seq_len}; raise seq_len)" if skipped else "")
            + "."
        )
    if valid_records is not None:
        valid, vskipped = _tokenize_records(
            tokenizer, kind, valid_records, source=source, seq_len=seq_len, sep=sep, pad=pad, max_tokens=valid_max_tokens
        )
        if len(valid) == 0:
            raise MoeforgeError(f"data source {source.name!r}: the validation data yields no blocks.")
    else:
        train, valid = holdout(train, source.valid_fraction, source.name)
        if valid is not None and valid_max_tokens is not None:
            keep = max(1, int(np.searchsorted(np.cumsum(valid.lengths), valid_max_tokens)) + 1)
            valid = valid.subset(np.arange(min(keep, len(valid))))
    dom = DomainData(source.name, kind, train, valid, skipped)
    if entry is not None:
        try:
            entry.parent.mkdir(parents=True, exist_ok=True)
            tmp = owned_temp_dir(entry.parent, entry.name)  # sweeps a build of this entry killed before its rename
            try:
                _save(tmp, dom)
                os.replace(tmp, entry)
            except OSError:
                shutil.rmtree(tmp, ignore_errors=True)
                if not (entry / "meta.json").is_file():
                    raise
        except OSError as err:  # the cache is an optimisation: an unwritable cache must not stop training
            logger.warning(
                "moeforge: could not cache the tokens of data source %r in %s (%s); training goes on without "
                "the cache. Set cache_dir to a writable directory (or 'off') to silence this.",
                source.name, entry.parent, err.strerror or err,
            )
    return dom


def build_domains(config, tokenizer, *, valid_max_tokens: int | None = None) -> list[DomainData]:
    """Every domain of a :class:`~moeforge.train.config.TrainConfig`, in config order."""
    digest = tokenizer_fingerprint(tokenizer)
    domains = [
        build_domain(
            src,
            tokenizer,
            seq_len=config.seq_len,
            separator=config.separator,
            cache_dir=config.cache_dir,
            valid_max_tokens=valid_max_tokens,
            tokenizer_digest=digest,
        )
        for src in config.data
    ]
    for dom in domains:
        if dom.skipped:
            logger.warning(
                "data source %r: %d chat examples had no assistant token within seq_len=%d and were left out "
                "(%d training blocks remain); raise seq_len to keep them.", dom.name, dom.skipped, config.seq_len,
                len(dom.train),
            )
    return domains
