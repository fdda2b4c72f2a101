"""Deterministic, process-sharded Grain datasets and global batches.

Sharding rule: the corpus is split into ``L`` logical shards by record key (independent of the
number of processes). Global batch ``s`` is the concatenation, over shards ``0..L-1``, of rows
``[s*B/L, (s+1)*B/L)`` of each shard's endless row stream (each source's rows shuffled afresh
every epoch, sources mixed by weight). Process ``p`` of ``P`` owns the contiguous shards
``[p*L/P, (p+1)*L/P)``: it reads, tokenizes and packs only those, and its rows are exactly the
ones its devices hold in the batch-sharded global array. So the global batch is identical for
any process count dividing ``L``, and the batch for step ``s`` is a pure function of
``(corpus, seed, s)``. Checkpoints still save the Grain iterator's state.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import grain
from grain.experimental import ZipMapDataset
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding

# pack_concat_split is re-exported: the spine's callers use pipeline.pack_concat_split.
from slimjax.data.packing import PackedRows, pack_concat_split, to_example  # noqa: F401
from slimjax.sharding import Rules

# A batch is a dict of named arrays, each described by the logical names of its dimensions and
# its dtype; "batch" rows are split over the batch mesh axes like every activation. This is the
# language-model batch; other tasks add arrays of their own (e.g. "labels": (("batch",), int32)).
BatchSpec = dict[str, tuple[tuple[str, ...], Any]]
LM_BATCH: BatchSpec = {
    "inputs": (("batch", "length"), np.int32),
    "targets": (("batch", "length"), np.int32),
    "segment_ids": (("batch", "length"), np.int32),
    "positions": (("batch", "length"), np.int32),
    "loss_mask": (("batch", "length"), np.float32),
}
BATCH_KEYS = tuple(LM_BATCH)
# A classification batch (``slim.classify``): the language-model arrays plus each row's class id
# and token types (all 0, one text per row: the encoder reads them, the decoder does not).
CLASSIFY_BATCH: BatchSpec = {**LM_BATCH, "labels": (("batch",), np.int32),
                             "token_types": (("batch", "length"), np.int32)}


def shard_stream(rows_per_source: Sequence[PackedRows], weights: Sequence[float], seed: int,
                 shard: int) -> grain.MapDataset:
    """One logical shard's endless rows: each source's rows reshuffled every epoch, mixed by weight.

    The shuffle seeds depend on ``(seed, shard, source)`` only, never on the process layout.
    """
    parts = [grain.MapDataset.source(rows).shuffle(seed=_seed(seed, shard, k)).repeat()
             for k, rows in enumerate(rows_per_source)]
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, list(weights))


def train_dataset(shards: Sequence[Sequence[PackedRows]], weights: Sequence[float], rows_per_shard: int,
                  seed: int, first_shard: int = 0) -> grain.MapDataset:
    """This process's local batches: element ``s`` is its slice of global batch ``s``.

    ``shards`` are this process's consecutive logical shards (starting at ``first_shard``), each a
    list of packed rows per source. The stream is endless, so ``dataset[s]`` exists for every
    step ``s`` and resuming is indexing.
    """
    streams = [shard_stream(rows, weights, seed, first_shard + i).batch(rows_per_shard, drop_remainder=True)
               for i, rows in enumerate(shards)]
    zipped = ZipMapDataset(streams)
    return zipped.map(_concat_example)


def _concat_example(parts: tuple[dict[str, np.ndarray], ...]) -> dict[str, np.ndarray]:
    return to_example({k: np.concatenate([p[k] for p in parts]) for k in parts[0]})


def _seed(seed: int, shard: int, source: int) -> int:
    return int(np.random.SeedSequence([seed, shard, source]).generate_state(1)[0])


def eval_batches(rows: PackedRows, global_batch: int, max_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[dict[str, np.ndarray]]:
    """Held-out rows in fixed order, padded to whole batches; this process's slices only."""
    columns = dataclasses.asdict(rows)
    return [eval_batch(lambda i: {k: v[i] for k, v in columns.items()}, len(rows), idx)
            for idx in eval_indices(len(rows), global_batch, max_batches, process_index, process_count)]


def eval_batch(take: Callable[[np.ndarray], dict[str, np.ndarray]], n_rows: int, idx: np.ndarray
               ) -> dict[str, np.ndarray]:
    """The held-out batch of row indices ``idx`` (``eval_indices``); ``take(indices)`` gives those
    rows' arrays. Indices past ``n_rows`` repeat the last row, fully masked."""
    picked = take(np.minimum(idx, n_rows - 1))
    picked["segment_ids"] = np.where((idx < n_rows)[:, None], picked["segment_ids"], 0)  # pad rows: all masked
    return to_example(picked)


def eval_indices(n_rows: int, global_batch: int, max_batches: int, process_index: int = 0,
                 process_count: int = 1) -> list[np.ndarray]:
    """The row indices of this process's slice of each held-out batch (at most ``max_batches``,
    0: all); indices past ``n_rows`` pad the last batch."""
    n = -(-n_rows // global_batch)
    if max_batches:
        n = min(n, max_batches)
    local = global_batch // process_count
    start = process_index * local
    return [np.arange(b * global_batch + start, b * global_batch + start + local) for b in range(n)]


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


def batch_shardings(mesh: Mesh, rules: Rules, spec: BatchSpec = LM_BATCH) -> dict[str, NamedSharding]:
    """Each named array's sharding from the logical names of its dimensions."""
    return {key: NamedSharding(mesh, rules.spec(axes, what=f"batch array '{key}'")) for key, (axes, _) in spec.items()}


def abstract_batch(spec: BatchSpec, sizes: dict[str, int], shardings: dict[str, NamedSharding]
                   ) -> dict[str, jax.ShapeDtypeStruct]:
    """Global shapes of a batch (``sizes`` gives each logical name's length, e.g. batch and length)."""
    return {key: jax.ShapeDtypeStruct(tuple(sizes[a] for a in axes), dtype, sharding=shardings[key])
            for key, (axes, dtype) in spec.items()}


def to_global(batch: dict[str, np.ndarray], sharding: NamedSharding | dict[str, NamedSharding]
              ) -> dict[str, jax.Array]:
    """Process-local numpy rows -> global ``jax.Array``s (each process passes only its rows).

    ``sharding`` is one for every array or a dict by name; every array of the batch is converted.
    """
    out = {}
    for key, local in batch.items():
        sh = sharding[key] if isinstance(sharding, dict) else sharding
        global_shape = (local.shape[0] * jax.process_count(), *local.shape[1:])
        out[key] = jax.make_array_from_process_local_data(sh, local, global_shape)
    return out
