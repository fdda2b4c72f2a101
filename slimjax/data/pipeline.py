"""Packing, deterministic Grain datasets and global batches.

Rows are windows of ``seq_len + 1`` tokens cut from the concatenated documents (each window
overlaps the next by one token, so every token is a target once). Inside a row, ``segment_ids``
number the documents (0 = padding) and ``positions`` restart at each document start and at the
row start. The model turns segment ids into an attention mask, so packed documents never see
each other, and the loss ignores targets that cross a document boundary.

Sharding rule: global batch ``s`` holds shuffled rows ``[s*B, (s+1)*B)``. Process ``p`` of ``P``
reads only its contiguous ``B/P`` slice of them - exactly the rows its devices hold in the
batch-sharded global array - so the global batch is identical for any process count, and the
batch for step ``s`` is a pure function of ``(seed, s)``. Checkpoints still save the Grain
iterator's state, so pipelines without random access resume exactly too.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

from slimjax.sharding import Rules

BATCH_KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


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


def train_dataset(rows: PackedRows, global_batch: int, seed: int, process_index: int = 0,
                  process_count: int = 1) -> grain.MapDataset:
    """This process's local batches: element ``s`` is its slice of global batch ``s``.

    Shuffling is a seeded index permutation, fresh each epoch; the stream repeats forever, so
    ``dataset[s]`` exists for every step ``s`` and resumption is ``dataset[s:]``.
    """
    local = global_batch // process_count
    ds = grain.MapDataset.source(rows).shuffle(seed=seed).repeat()
    # Blocks of `local` rows; block b belongs to process b % P, so process p's block for step s
    # is block s*P + p: rows [s*B + p*local, s*B + (p+1)*local).
    ds = ds.batch(local, drop_remainder=True)[process_index::process_count]
    return ds.map(to_example)


def eval_batches(rows: PackedRows, global_batch: int, max_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Held-out rows in fixed order, padded to whole batches; this process's slices only."""
    n = -(-len(rows) // global_batch)
    if max_batches:
        n = min(n, max_batches)
    local = global_batch // process_count
    out = []
    for b in range(n):
        idx = np.arange(b * global_batch + process_index * local, b * global_batch + (process_index + 1) * local)
        valid = idx < len(rows)
        picked = {k: v[np.minimum(idx, len(rows) - 1)] for k, v in dataclasses.asdict(rows).items()}
        picked["segment_ids"] = np.where(valid[:, None], picked["segment_ids"], 0)  # pad rows: all masked
        out.append(to_example(picked))
    return out


def iterate(ds: grain.MapDataset, state: dict | None = None, prefetch: int = 4) -> grain.DatasetIterator:
    """A checkpointable iterator with background prefetch threads, positioned at ``state``.

    ``state`` is what ``iterator.get_state()`` returned earlier (saved with each checkpoint).
    """
    options = grain.ReadOptions(num_threads=2, prefetch_buffer_size=prefetch)
    iterator = iter(ds.to_iter_dataset(options))
    if state is not None:
        iterator.set_state(state)
    return iterator


def batch_sharding(mesh: Mesh, rules: Rules) -> NamedSharding:
    """Rows split over the batch mesh axes, sequence replicated."""
    return NamedSharding(mesh, rules.spec(("batch", "length")))


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding) -> dict[str, jax.Array]:
    """Process-local numpy rows -> global ``jax.Array``s (each process passes only its rows)."""
    out = {}
    for key in BATCH_KEYS:
        local = batch[key]
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sharding, local, global_shape)
    return out
