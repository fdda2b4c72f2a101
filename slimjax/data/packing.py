"""Packing documents into fixed-length rows with segment ids and positions.

A row holds ``seq_len + 1`` tokens (inputs and targets are the row shifted by one). Inside a
row, ``segment_ids`` number the documents from 1 (0 = padding) and ``positions`` restart at 0 at
each document start and at the row start. The model turns segment ids into an attention mask,
so packed documents never see each other, and the loss ignores targets that cross a document
boundary (``to_example``).

Two packers:

- ``pack_concat_split`` concatenates the documents and cuts windows with a stride of
  ``seq_len`` (each window overlaps the next by one token, so every token is a target once): no
  padding, but documents are cut at row ends.
- ``pack_first_fit`` never cuts a document that fits in a row: each goes into the first of the
  open rows with room for it (a new row when none has). Longer documents are cut into full rows
  first (overlapping by one token, like concat-split) and their remainder is placed like a
  short document. Rows are padded.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import numpy as np

@dataclasses.dataclass(frozen=True)
class PackedRows:
    """``[rows, seq_len + 1]`` arrays: token ids, segment ids (0 = pad) and positions."""

    tokens: np.ndarray
    segment_ids: np.ndarray
    positions: np.ndarray

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        return {"tokens": self.tokens[i], "segment_ids": self.segment_ids[i], "positions": self.positions[i]}


def pack_concat_split(docs: Sequence[np.ndarray], seq_len: int, pad_last: bool = False,
                      pad_id: int = 0) -> PackedRows:
    """Concatenates documents and cuts rows of ``seq_len + 1`` tokens with a stride of ``seq_len``.

    ``pad_last`` keeps the tail as a padded final row (evaluation wants every token); training
    drops it.
    """
    lengths = np.asarray([len(d) for d in docs], np.int64)
    stream = np.concatenate(docs).astype(np.int32) if len(docs) else np.zeros(0, np.int32)
    doc_id = np.repeat(np.arange(len(docs)), lengths)
    doc_start = np.concatenate([[0], np.cumsum(lengths)[:-1]]) if len(docs) else np.zeros(0, np.int64)
    n_rows = max(len(stream) - 1, 0) // seq_len
    if pad_last and len(stream) - 1 > n_rows * seq_len:
        n_rows += 1
    total = n_rows * seq_len + 1
    pad = max(total - len(stream), 0)
    stream = np.concatenate([stream, np.full(pad, pad_id, np.int32)])
    doc_id = np.concatenate([doc_id, np.full(pad, -1)])
    pos_in_doc = np.arange(total) - np.concatenate([doc_start[doc_id[: total - pad]], np.zeros(pad, np.int64)])
    windows = np.arange(n_rows)[:, None] * seq_len + np.arange(seq_len + 1)[None, :]
    tokens, row_docs, row_pos = stream[windows], doc_id[windows], pos_in_doc[windows]
    # Segments are numbered from 1 within each row; padding (doc -1) is segment 0.
    segment_ids = np.where(row_docs >= 0, row_docs - row_docs[:, :1] + 1, 0).astype(np.int32)
    # A document that began before this row restarts at position 0 at the row start.
    positions = np.where(row_docs >= 0, np.minimum(row_pos, np.arange(seq_len + 1)[None, :]), 0)
    return PackedRows(tokens.astype(np.int32), segment_ids, positions.astype(np.int32))


def to_example(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Shifted model inputs from ``[..., seq_len + 1]`` rows; targets crossing documents are masked."""
    tok, seg, pos = rows["tokens"], rows["segment_ids"], rows["positions"]
    return {
        "inputs": tok[..., :-1],
        "targets": tok[..., 1:],
        "segment_ids": seg[..., :-1],
        "positions": pos[..., :-1],
        "loss_mask": ((seg[..., 1:] == seg[..., :-1]) & (seg[..., :-1] != 0)).astype(np.float32),
    }


def pack_first_fit(docs: Sequence[np.ndarray], seq_len: int, open_rows: int = 64, pad_id: int = 0) -> PackedRows:
    """First-fit packing over a window of the ``open_rows`` most recently opened rows.

    Bounding the open rows keeps each placement O(open_rows) while losing little: rows that stay
    open longest are the nearly full ones.
    """
    width = seq_len + 1
    pieces = []  # (doc, start, length): what goes where, in order
    for d, doc in enumerate(docs):
        start = 0
        while len(doc) - start > width:  # full rows of a long document, one token of overlap
            pieces.append((d, start, width))
            start += seq_len
        if len(doc) - start >= 2:  # a single leftover token would hold no target: drop it
            pieces.append((d, start, len(doc) - start))
    free = np.zeros(0, np.int64)  # room left in each open row (parallel to `row_of_slot`)
    row_of_slot = np.zeros(0, np.int64)
    placed_row, placed_col, n_rows = np.empty(len(pieces), np.int64), np.empty(len(pieces), np.int64), 0
    for i, (_, _, length) in enumerate(pieces):
        fits = np.flatnonzero(free >= length)
        if len(fits):
            slot = fits[0]
        else:  # open a new row; close the oldest when the window is full
            if len(free) == open_rows:
                free, row_of_slot = free[1:], row_of_slot[1:]
            free = np.append(free, width)
            row_of_slot = np.append(row_of_slot, n_rows)
            n_rows += 1
            slot = len(free) - 1
        placed_row[i], placed_col[i] = row_of_slot[slot], width - free[slot]
        free[slot] -= length
    return _assemble(docs, pieces, placed_row, placed_col, n_rows, width, pad_id)


def _assemble(docs: Sequence[np.ndarray], pieces: list[tuple[int, int, int]], rows: np.ndarray,
              cols: np.ndarray, n_rows: int, width: int, pad_id: int) -> PackedRows:
    """Scatters the placed pieces into padded ``[n_rows, width]`` arrays in one vectorised pass."""
    tokens = np.full((n_rows, width), pad_id, np.int32)
    segment_ids = np.zeros((n_rows, width), np.int32)
    positions = np.zeros((n_rows, width), np.int32)
    if not pieces:
        return PackedRows(tokens, segment_ids, positions)
    doc_idx, starts, lengths = (np.asarray(x, np.int64) for x in zip(*pieces))
    offsets = np.concatenate([[0], np.cumsum([len(d) for d in docs])])
    stream = np.concatenate(docs).astype(np.int32)
    # Segment ids count pieces in each row in placement order: rank of the piece among its row's.
    order = np.argsort(rows, kind="stable")
    first_of_row = np.searchsorted(rows[order], rows[order], side="left")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order)) - first_of_row
    within = np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    r, c = np.repeat(rows, lengths), np.repeat(cols, lengths) + within
    tokens[r, c] = stream[np.repeat(offsets[doc_idx] + starts, lengths) + within]
    segment_ids[r, c] = np.repeat(rank + 1, lengths)
    positions[r, c] = within
    return PackedRows(tokens, segment_ids, positions)
