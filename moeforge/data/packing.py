"""Tokenize records and pack them into fixed-length blocks.

Text documents are tokenized without special tokens, each followed by a separator token (the
tokenizer's EOS by default), concatenated into one stream and cut into blocks of ``seq_len``
tokens (the last partial block is kept, padded, with its padding masked out of the loss).
Chat examples keep their per-token labels (-100 outside assistant turns); by default each
example fills one padded block (truncated to ``seq_len``), or, with ``pack``, examples are
concatenated and cut like text.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..errors import MoeforgeError
from .chat import IGNORE_INDEX, tokenize_chat

TOKENIZE_BATCH = 64


@dataclass
class Blocks:
    """N blocks of L tokens.

    Attributes:
        input_ids: (N, L) int32 token ids (padding positions hold the pad id).
        lengths: (N,) int32 number of real tokens at the start of each block.
        labels: (N, L) int32 targets with -100 where no loss is taken, or None when every real
            token is a target (packed text).
    """

    input_ids: np.ndarray
    lengths: np.ndarray
    labels: np.ndarray | None = None

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[1])

    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def digest(self) -> str:
        """SHA-256 of the blocks' token ids, lengths and labels: equal digests, equal training data."""
        import hashlib

        h = hashlib.sha256()
        for array in (self.input_ids, self.lengths, self.labels):
            if array is not None:
                h.update(str(array.shape).encode())
                h.update(np.ascontiguousarray(array, dtype=np.int32).tobytes())
        return h.hexdigest()[:32]

    def subset(self, index: np.ndarray) -> Blocks:
        return Blocks(
            self.input_ids[index], self.lengths[index], None if self.labels is None else self.labels[index]
        )

    def batch(self, index, *, trim: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(input_ids, labels)`` long tensors (B, L') for block indices ``index``.

        With ``trim``, trailing columns that are padding in every row are cut (right padding and
        causal attention make this exact).
        """
        index = np.asarray(index, dtype=np.int64)
        ids = torch.from_numpy(self.input_ids[index].astype(np.int64))
        lengths = torch.from_numpy(self.lengths[index].astype(np.int64))
        if self.labels is None:
            labels = ids.clone()
        else:
            labels = torch.from_numpy(self.labels[index].astype(np.int64))
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        labels[pos >= lengths.unsqueeze(1)] = IGNORE_INDEX
        if trim and ids.shape[0] > 0:
            width = max(2, int(lengths.max()))
            ids, labels = ids[:, :width], labels[:, :width]
        return ids, labels


def _tokenize_docs(tokenizer, docs: list[str], max_tokens: int | None) -> list[list[int]]:
    out: list[list[int]] = []
    total = 0
    for start in range(0, len(docs), TOKENIZE_BATCH):
        batch = docs[start : start + TOKENIZE_BATCH]
        ids = tokenizer(batch, add_special_tokens=False)["input_ids"]
        for seq in ids:
            out.append(list(seq))
            total += len(seq) + 1
        if max_tokens is not None and total >= max_tokens:
            break
    return out


def _cut(stream: np.ndarray, labels: np.ndarray | None, seq_len: int, pad_id: int) -> Blocks:
    n = len(stream)
    full = n // seq_len
    rest = n - full * seq_len
    blocks = [stream[: full * seq_len].reshape(full, seq_len)]
    lab = None if labels is None else [labels[: full * seq_len].reshape(full, seq_len)]
    lengths = [np.full(full, seq_len, dtype=np.int32)]
    if rest >= 2:
        tail = np.full((1, seq_len), pad_id, dtype=np.int32)
        tail[0, :rest] = stream[full * seq_len :]
        blocks.append(tail)
        lengths.append(np.array([rest], dtype=np.int32))
        if lab is not None:
            ltail = np.full((1, seq_len), IGNORE_INDEX, dtype=np.int32)
            ltail[0, :rest] = labels[full * seq_len :]
            lab.append(ltail)
    return Blocks(
        np.concatenate(blocks).astype(np.int32),
        np.concatenate(lengths).astype(np.int32),
        None if lab is None else np.concatenate(lab).astype(np.int32),
    )


def pack_text(tokenizer, docs: list[str], *, seq_len: int, separator_id: int, max_tokens: int | None = None) -> Blocks:
    """Tokenize documents, join them with ``separator_id`` after each, and cut into blocks."""
    token_lists = _tokenize_docs(tokenizer, docs, max_tokens)
    total = sum(len(t) + 1 for t in token_lists)
    stream = np.empty(total, dtype=np.int32)
    pos = 0
    for t in token_lists:
        stream[pos : pos + len(t)] = t
        stream[pos + len(t)] = separator_id
        pos += len(t) + 1
    if max_tokens is not None:
        stream = stream[:max_tokens]
    return _cut(stream, None, seq_len, separator_id)


def pack_chat(
    tokenizer,
    conversations: list[list[dict]],
    *,
    seq_len: int,
    pad_id: int,
    pack: bool = False,
    max_tokens: int | None = None,
) -> tuple[Blocks, int]:
    """Render and tokenize conversations; returns (blocks, number of examples truncated to nothing).

    Without ``pack`` each example becomes one block (truncated to ``seq_len``); an example whose
    assistant tokens all fall beyond ``seq_len`` is skipped and counted. With ``pack``, blocks
    without any target token are left out.
    """
    examples = []
    total = 0
    for conv in conversations:
        ids, labels = tokenize_chat(tokenizer, conv)
        examples.append((ids, labels))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if pack:
        stream = np.array([t for ids, _ in examples for t in ids], dtype=np.int32)
        labels = np.array([t for _, lab in examples for t in lab], dtype=np.int32)
        if max_tokens is not None:
            stream, labels = stream[:max_tokens], labels[:max_tokens]
        blocks = _cut(stream, labels, seq_len, pad_id)
        # a block of prompt text alone (long system or user turns) carries no loss: a batch of
        # such blocks would have nothing to train on, so they are left out
        targets = (blocks.labels[:, 1:] != IGNORE_INDEX) & (np.arange(1, seq_len) < blocks.lengths[:, None])
        return blocks.subset(np.flatnonzero(targets.any(axis=1))), 0
    rows, lab_rows, lengths = [], [], []
    skipped = 0
    for ids, labels in examples:
        ids, labels = ids[:seq_len], labels[:seq_len]
        # labels[0] is never a target (nothing precedes it); require a target after position 0
        if all(x == IGNORE_INDEX for x in labels[1:]):
            skipped += 1
            continue
        row = np.full(seq_len, pad_id, dtype=np.int32)
        row[: len(ids)] = ids
        lab = np.full(seq_len, IGNORE_INDEX, dtype=np.int32)
        lab[: len(labels)] = labels
        rows.append(row)
        lab_rows.append(lab)
        lengths.append(len(ids))
    if not rows:
        return Blocks(np.zeros((0, seq_len), np.int32), np.zeros(0, np.int32), np.zeros((0, seq_len), np.int32)), skipped
    return Blocks(np.stack(rows), np.array(lengths, dtype=np.int32), np.stack(lab_rows)), skipped


def holdout(blocks: Blocks, fraction: float, name: str) -> tuple[Blocks, Blocks | None]:
    """Split off every k-th block (k = round(1 / fraction)) as validation; at least one block."""
    n = len(blocks)
    if fraction <= 0:
        return blocks, None
    if n < 2:
        raise MoeforgeError(
            f"data source {name!r} yields {n} block(s) of training data, too few to hold out a validation "
            "slice; add data, lower seq_len, set valid_fraction: 0 or give a valid_path."
        )
    k = max(2, round(1.0 / fraction))
    is_valid = (np.arange(n) % k) == (k - 1)
    if not is_valid.any():
        is_valid[-1] = True
    return blocks.subset(np.flatnonzero(~is_valid)), blocks.subset(np.flatnonzero(is_valid))


def picks_attention_mask(picks: list[tuple[Blocks, int]], width: int) -> torch.Tensor | None:
    """(B, width) attention mask of the picked blocks: False on each one's right padding; None when nothing is padded."""
    lengths = torch.tensor([int(blocks.lengths[i]) for blocks, i in picks])
    if bool((lengths >= width).all()):
        return None
    return torch.arange(width)[None, :] < lengths[:, None]


def collate(picks: list[tuple[Blocks, int]], *, trim: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Stack single blocks from possibly different domains into ``(input_ids, labels)`` (B, L').

    Trailing all-padding columns are trimmed when ``trim`` (exact under right padding and
    causal attention); every block must have the same ``seq_len``.
    """
    rows = [blocks.batch([i], trim=False) for blocks, i in picks]
    ids = torch.cat([r[0] for r in rows])
    labels = torch.cat([r[1] for r in rows])
    if trim and picks:
        width = max(2, max(int(blocks.lengths[i]) for blocks, i in picks))
        ids, labels = ids[:, :width], labels[:, :width]
    return ids, labels
