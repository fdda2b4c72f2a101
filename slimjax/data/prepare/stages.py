"""The per-task work of ``slimjax prepare``, run in worker processes.

A task is a slice of one source (a group of its files, or a range of TFDS records). Every stage
re-reads its task's records in the same order and applies the same transforms, so a record's
key identifies the same document in every stage and only signatures travel between stages:
memory is bounded by signatures, not text.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import resource
from typing import Any, Iterator

import numpy as np

from slimjax.config import SourceConfig
from slimjax.data import sources, text
from slimjax.data.prepare import minhash

FILES_PER_TASK = 64
TFDS_RECORDS_PER_TASK = 4096
SIGNATURE_BATCH = 4096  # documents per rensa call: bounds the shingle buffer


@dataclasses.dataclass(frozen=True)
class Options:
    """What the workers need to know (a picklable subset of the prepare options)."""

    sources: tuple[SourceConfig, ...]
    min_chars: int
    ngram: int
    num_perm: int
    strict: bool


@dataclasses.dataclass(frozen=True)
class Task:
    """Units ``unit_ids`` of source ``source`` (or TFDS records ``[lo, hi)`` of its one split)."""

    index: int
    source: int
    unit_ids: tuple[int, ...]
    units: tuple[str, ...]
    lo: int = 0
    hi: int = -1

    def want(self, key: sources.Key) -> bool:
        return self.hi < 0 or self.lo <= key[1] < self.hi


@dataclasses.dataclass
class Scan:
    """Stage-1 output of one task: per kept document its key, label, size, exact hash and signature."""

    task: int
    keys: np.ndarray  # [n, 2] int64
    labels: list[str]  # source label of each kept document (its redpajama_set_name)
    nbytes: np.ndarray  # [n] int64, UTF-8 bytes after NFC
    exact: np.ndarray  # [n, 16] uint8: digest of the normal form
    signatures: np.ndarray  # [n, num_perm] uint32
    short: collections.Counter  # label -> documents dropped by the short-document filter
    short_bytes: collections.Counter
    read_stats: sources.ReadStats
    peak_rss_mb: float  # of the worker process that scanned the task, when it finished


def make_tasks(srcs: tuple[SourceConfig, ...]) -> list[Task]:
    """Cuts every source into tasks of at most FILES_PER_TASK files (TFDS: record ranges)."""
    tasks: list[Task] = []
    for s, src in enumerate(srcs):
        unit_list = sources.units(src, "train", ())
        if src.kind == "tfds":
            n = len(sources.tfds_source(src, unit_list[0]))
            for lo in range(0, n, TFDS_RECORDS_PER_TASK):
                tasks.append(Task(len(tasks), s, (0,), tuple(unit_list), lo, min(lo + TFDS_RECORDS_PER_TASK, n)))
            continue
        step = 1 if src.kind in ("jsonl", "slimpajama") else FILES_PER_TASK
        for start in range(0, len(unit_list), step):
            ids = tuple(range(start, min(start + step, len(unit_list))))
            tasks.append(Task(len(tasks), s, ids, tuple(unit_list[i] for i in ids)))
    return tasks


def documents(task: Task, opts: Options, read_stats: sources.ReadStats
              ) -> Iterator[tuple[sources.Record, str, str | None]]:
    """(record, NFC text, normal form or None when the short-document filter drops it)."""
    src = opts.sources[task.source]
    for record in sources.read(src, list(task.units), task.want, opts.strict, read_stats, list(task.unit_ids)):
        doc = text.nfc(record.text)
        normal = text.normal_form(doc)
        yield record, doc, (normal if len(normal) >= max(opts.min_chars, 1) else None)


def label_of(record: sources.Record, src: SourceConfig) -> str:
    return str(record.meta.get(sources.SET_NAME_KEY) or src.name)


def scan(task: Task, opts: Options) -> Scan:
    """Stage 1: read, NFC, filter short documents, MinHash the rest."""
    src = opts.sources[task.source]
    stats = sources.ReadStats()
    keys, labels, nbytes, exact, sigs, shingles = [], [], [], [], [], []
    short, short_bytes = collections.Counter(), collections.Counter()
    for record, doc, normal in documents(task, opts, stats):
        label = label_of(record, src)
        size = len(doc.encode("utf-8"))
        if normal is None:
            short[label] += 1
            short_bytes[label] += size
            continue
        keys.append(record.key)
        labels.append(label)
        nbytes.append(size)
        exact.append(np.frombuffer(text.exact_hash(normal), np.uint8))
        shingles.append(minhash.shingle_hashes(normal, opts.ngram))
        if len(shingles) == SIGNATURE_BATCH:
            sigs.append(minhash.signatures(shingles, opts.num_perm))
            shingles = []
    sigs.append(minhash.signatures(shingles, opts.num_perm))
    return Scan(task.index, np.asarray(keys, np.int64).reshape(-1, 2), labels, np.asarray(nbytes, np.int64),
                np.asarray(exact, np.uint8).reshape(-1, 16), np.concatenate(sigs), short, short_bytes, stats,
                resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def shingle_sets(task: Task, opts: Options, wanted: set[tuple[int, int]]) -> dict[tuple[int, int], np.ndarray]:
    """Verification: the exact shingle set (sorted unique hashes) of each wanted document."""
    out = {}
    for record, _, normal in documents(task, opts, sources.ReadStats()):
        if normal is not None and record.key in wanted:
            out[record.key] = np.unique(minhash.shingle_hashes(normal, opts.ngram))
    return out


def write(task: Task, opts: Options, decisions: dict[tuple[int, int], str], root: str) -> dict[str, int]:
    """Last stage: appends each kept document to this task's ``train`` or ``validation`` file.

    ``decisions`` maps a key to its split; files are written under a temporary name and renamed
    when complete.
    """
    src = opts.sources[task.source]
    writers: dict[str, _ZstdLines] = {}
    counts: collections.Counter = collections.Counter()
    try:
        want = lambda key: task.want(key) and key in decisions  # noqa: E731
        for record in sources.read(src, list(task.units), want, opts.strict, sources.ReadStats(),
                                   list(task.unit_ids)):
            split, doc = decisions[record.key], text.nfc(record.text)
            if split not in writers:
                writers[split] = _ZstdLines(os.path.join(root, output_name(split, task.index)))
            meta: dict[str, Any] = dict(record.meta)
            meta[sources.SET_NAME_KEY] = label_of(record, src)
            writers[split].write({"text": doc, "meta": meta})
            counts[split] += 1
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    for w in writers.values():
        w.close()
    return dict(counts)


def heldout_draw(doc_ids: np.ndarray, seed: int) -> np.ndarray:
    """A uniform draw in [0, 1) per document id, the same for a given seed on every runner: a
    kept document is held out when its draw is below the held-out share."""
    draw = np.frombuffer(hashlib.blake2b(seed.to_bytes(8, "little"), digest_size=8).digest(), np.uint64)[0]
    ids = np.asarray(doc_ids, np.int64).astype(np.uint64)
    return (minhash.mix64(ids ^ draw) >> np.uint64(11)).astype(np.float64) / 2.0**53


def output_name(split: str, task: int) -> str:
    """SlimPajama's layout: train/chunk1..10/example_train_K, validation/chunk1..5/example_holdout_K."""
    if split == "train":
        return f"train/chunk{task % 10 + 1}/example_train_{task}.jsonl.zst"
    return f"validation/chunk{task % 5 + 1}/example_holdout_{task}.jsonl.zst"


class _ZstdLines:
    """JSON Lines into a zstd file, visible under its final name only once closed."""

    def __init__(self, path: str):
        import zstandard

        os.makedirs(os.path.dirname(path), exist_ok=True)
        self.path, self.tmp = path, f"{path}.tmp-{os.getpid()}"
        self._raw = open(self.tmp, "wb")
        self._zst = zstandard.ZstdCompressor(level=3).stream_writer(self._raw)

    def write(self, obj: dict[str, Any]) -> None:
        self._zst.write(json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n")

    def close(self) -> None:
        self._zst.close()  # flushes the frame and closes the file
        os.replace(self.tmp, self.path)

    def abort(self) -> None:
        self._zst.close()
        os.remove(self.tmp)
