"""Rows tokenized and packed ahead of training (``slimjax tokenize``), stored as ArrayRecord shards,
and the loader that reads them back with random access.

A *prepared directory* holds, for each source ``k`` (after the ``slimpajama`` preset is expanded)
and each logical shard ``i`` exactly as :class:`loader.Layout` splits the records, one ArrayRecord
file ``train/source-KKK/shard-IIIII.array_record`` of that shard's packed rows of that source, in
the order the in-memory loader packs them; ``eval.array_record`` with the held-out rows;
``tokenizer/`` with the tokenizer file (none for ``byte``); and ``manifest.json`` (format version,
tokenizer kind and SHA-256, seq_len, packing, shard count, rows/documents/bytes per source and
shard, the corpus fingerprint: a SHA-256 over each (source, shard)'s SHA-256 of its documents in
order, and the data config it was made with).

Reading builds the same Grain pipeline as the in-memory loader (``pipeline.train_dataset``) over
lazily read rows: each row is decoded when Grain asks for it, so a process opens only its own
shards' files, holds no rows before step 1 and its memory does not grow with the corpus. The
global batches are therefore the in-memory loader's, batch for batch, and resuming is the same
indexing into an endless stream.

A row is one record: ``tokens``, ``segment_ids`` and ``positions`` (each ``seq_len + 1`` int32,
little-endian) concatenated. Files are written with ``group_size:1``, so reading a row
decompresses only that row.

The writing side is made of pure per-shard steps (:func:`write_shard`: one (source, shard)'s
documents -> its file and counts, through :func:`shard_rows` and :func:`write_rows`), run in this
process or, with ``runner``, per (source, shard) on Apache Beam (``slimjax.data.tokenize_beam``).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import hashlib
import json
import os
import shutil
import threading
from typing import Any

import numpy as np

from slimjax.config import DataConfig, PretrainConfig, SourceConfig
from slimjax.data import beam_runner, loader, pipeline, sources, tokenizer
from slimjax.data.packing import PackedRows
from slimjax.errors import SlimjaxError

FORMAT = "slimjax-packed-rows"
VERSION = 1
MANIFEST = "manifest.json"
EVAL_FILE = "eval.array_record"
WRITER_OPTIONS = "group_size:1"  # one row per chunk: a random read decompresses one row
FIELDS = ("tokens", "segment_ids", "positions")
_TOKENIZER_FILES = {"sentencepiece": tokenizer.MODEL_NAME, "huggingface": "tokenizer.json"}


def shard_file(source: int, shard: int) -> str:
    """The path of source ``source``'s rows of logical shard ``shard``, relative to the directory."""
    return f"train/source-{source:03d}/shard-{shard:05d}.array_record"


def shard_rows(cfg: DataConfig, tok: tokenizer.Tokenizer, docs: list[str]) -> PackedRows:
    """One (source, shard)'s documents -> its packed rows, exactly as the in-memory loader packs them."""
    return loader.pack(cfg, tok, docs)


def encode_row(row: dict[str, np.ndarray]) -> bytes:
    """One row's record: its fields' int32 little-endian bytes, concatenated in ``FIELDS`` order."""
    return b"".join(np.ascontiguousarray(row[f], "<i4").tobytes() for f in FIELDS)


def decode_row(record: bytes, width: int) -> dict[str, np.ndarray]:
    """The inverse of :func:`encode_row` for rows of ``width`` (= seq_len + 1) tokens."""
    flat = np.frombuffer(record, "<i4").astype(np.int32, copy=False)  # no copy on little-endian hosts: a view
    if flat.size != len(FIELDS) * width:
        raise ValueError(f"a record of {len(record)} bytes is not a row of {width} tokens")
    return dict(zip(FIELDS, flat.reshape(len(FIELDS), width)))


def write_rows(path: str, rows: PackedRows) -> int:
    """Writes ``rows`` as one ArrayRecord file at ``path``; returns its size in bytes."""
    from array_record.python.array_record_module import ArrayRecordWriter

    os.makedirs(os.path.dirname(path), exist_ok=True)
    writer = ArrayRecordWriter(path, WRITER_OPTIONS)
    try:
        for i in range(len(rows)):
            writer.write(encode_row(rows[i]))
    finally:
        writer.close()
    return os.path.getsize(path)


def write_shard(cfg: DataConfig, tok: tokenizer.Tokenizer, source: int, shard: int,
                keyed_docs: collections.abc.Iterable[tuple[sources.Key, str]], root: str) -> dict[str, Any]:
    """One (source, shard)'s documents, ``(key, text)`` in key order (the order the in-memory loader
    packs them in), -> its file of packed rows under ``root``. Returns its counts (documents, rows,
    bytes) and the SHA-256 of its documents the corpus fingerprint chains."""
    digest = hashlib.sha256()
    docs = []
    for key, doc in keyed_docs:
        digest.update(_document_digest(source, key, doc))
        docs.append(doc)
    rows = shard_rows(cfg, tok, docs)
    size = write_rows(os.path.join(root, shard_file(source, shard)), rows)
    return {"documents": len(docs), "rows": len(rows), "bytes": size, "sha256": digest.hexdigest()}


def write(cfg: DataConfig, global_batch: int, vocab_size: int, out: str, runner: str = "local",
          beam_options: str = "") -> dict[str, Any]:
    """Tokenizes and packs every source's training documents per logical shard, and the held-out
    rows, into the prepared directory ``out`` (built as ``out.tmp-PID``, renamed at the end: ``out``
    is complete or absent). Returns the manifest.

    ``runner``: ``local`` (this process; memory: one source's documents at a time, each shard's
    packed, written and dropped in turn) or an Apache Beam runner (``beam_runner.BEAM_RUNNERS``,
    with ``beam_options`` passed through; one worker per unit read and per shard written, the
    tokenizer trained and the held-out rows written here). Both write the same bytes."""
    out = os.path.abspath(os.path.expanduser(out))
    if os.path.exists(out):
        raise SlimjaxError(f"--out '{out}' already exists; give a new directory")
    if loader.is_prepared(cfg):
        raise SlimjaxError("data.sources names a prepared directory; tokenize the document sources it came from")
    beam_runner.check_runner(runner)
    options = None if runner == "local" else beam_runner.pipeline_options(runner, beam_options)
    tmp = f"{out}.tmp-{os.getpid()}"
    try:
        manifest = _write(cfg, global_batch, vocab_size, tmp, runner, options)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return manifest


def _write(cfg: DataConfig, global_batch: int, vocab_size: int, tmp: str, runner: str, options: Any
           ) -> dict[str, Any]:
    srcs = loader.expand(cfg.sources)
    layout = loader.Layout.make(cfg, global_batch, 0, 1)
    stats = sources.ReadStats()
    # Checked before a tokenizer is trained: a source without documents names itself.
    for src in srcs:
        if (error := loader.no_documents(cfg, src, "train")):
            raise error
    os.makedirs(tmp)
    tok, tok_meta = _tokenizer(cfg, vocab_size, tmp)
    if runner == "local":
        counts = _local_shards(cfg, srcs, layout, tok, tmp, stats)
    else:
        from slimjax.data import tokenize_beam  # it builds on this module: imported here, not at the top

        counts = tokenize_beam.shards(cfg, srcs, layout, vocab_size, tok_meta, tmp, runner, options, stats)
    corpus = hashlib.sha256()
    source_meta = []
    for k, src in enumerate(srcs):
        entry: dict[str, Any] = {"name": src.name, "weight": src.weight, "documents": [], "rows": [], "bytes": []}
        for i in range(layout.shards):
            count = _nonempty(cfg, src, counts.get((k, i)), i, layout.shards)
            for field in ("documents", "rows", "bytes"):
                entry[field].append(count[field])
            corpus.update(bytes.fromhex(count["sha256"]))
        source_meta.append(entry)
    eval_docs = [doc for src in srcs for _, doc in loader.documents(cfg, src, "eval", lambda key: True, stats)]
    if not eval_docs:
        raise loader.no_held_out(cfg)
    eval_rows = loader.pack(cfg, tok, eval_docs, pad_last=True)
    manifest = {
        "format": FORMAT, "version": VERSION, "seq_len": cfg.seq_len, "packing": cfg.packing,
        "shards": layout.shards, "tokenizer": tok_meta, "corpus_sha256": corpus.hexdigest(),
        "sources": source_meta,
        "eval": {"documents": len(eval_docs), "rows": len(eval_rows),
                 "bytes": write_rows(os.path.join(tmp, EVAL_FILE), eval_rows)},
        "tokens": cfg.seq_len * sum(sum(s["rows"]) for s in source_meta),
        "skipped": dict(stats.skipped), "first_skipped": stats.first,
        "data": _provenance(cfg),
    }
    with open(os.path.join(tmp, MANIFEST), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1)
    return manifest


def _local_shards(cfg: DataConfig, srcs: list[SourceConfig], layout: loader.Layout, tok: tokenizer.Tokenizer,
                  tmp: str, stats: sources.ReadStats) -> dict[tuple[int, int], dict[str, Any]]:
    """:func:`write_shard` of every (source, shard), in this process: ``{(source, shard): counts}``."""
    counts = {}
    for k, src in enumerate(srcs):
        docs: list[list[tuple[sources.Key, str]] | None] = [[] for _ in range(layout.shards)]
        for key, doc in loader.documents(cfg, src, "train", lambda key: True, stats):
            docs[layout.shard_of(key)].append((key, doc))
        for i in range(layout.shards):
            counts[k, i] = _nonempty(cfg, src, write_shard(cfg, tok, k, i, docs[i], tmp), i, layout.shards)
            docs[i] = None  # this shard is on disk: its documents and rows go
    return counts


def _nonempty(cfg: DataConfig, src: SourceConfig, count: dict[str, Any] | None, shard: int, shards: int
              ) -> dict[str, Any]:
    """A shard's counts if it holds rows; else the error naming the source (a shard no document
    fell into has no counts from a Beam pipeline: no group was formed for it)."""
    count = count or {"documents": 0, "rows": 0}
    loader.nonempty(cfg, src, range(count["rows"]), shard, shards, count["documents"], "rows")  # raises if none
    return count


def _document_digest(source: int, key: sources.Key, doc: str) -> bytes:
    """What a shard's SHA-256 hashes for one document: where it sits and what it says."""
    return hashlib.sha256(f"{source}|{key[0]}|{key[1]}|".encode() + doc.encode("utf-8", "surrogatepass")).digest()


def _provenance(cfg: DataConfig) -> dict[str, Any]:
    """The data config the rows were made from (for people; reading checks only the fields that shape rows)."""
    made = dataclasses.asdict(cfg)
    made.pop("prefetch")
    return made


def _tokenizer(cfg: DataConfig, vocab_size: int, tmp: str) -> tuple[tokenizer.Tokenizer, dict[str, Any]]:
    """The run's tokenizer, its file copied (or, for an untrained SentencePiece model, trained)
    into ``tmp/tokenizer/``, and its manifest entry."""
    # With ``tmp`` as the workdir, a SentencePiece model that must be trained lands in tmp/tokenizer/.
    tok = tokenizer.get_tokenizer(cfg.tokenizer_kind, cfg.tokenizer, tmp, vocab_size, cfg.tokenizer_type,
                                  lambda: loader.training_documents(cfg))
    meta: dict[str, Any] = {"kind": cfg.tokenizer_kind, "file": None, "sha256": None, "vocab_size": tok.vocab_size}
    if cfg.tokenizer_kind in _TOKENIZER_FILES:
        rel = os.path.join("tokenizer", _TOKENIZER_FILES[cfg.tokenizer_kind])
        dest = os.path.join(tmp, rel)
        if os.path.abspath(tok.path) != os.path.abspath(dest):
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            shutil.copyfile(tok.path, dest)
        meta.update(file=rel, sha256=_sha256(dest))
    return tok, meta


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Reading


def read_manifest(path: str) -> dict[str, Any]:
    """The manifest of the prepared directory ``path``; a SlimjaxError if it is not one."""
    where = os.path.join(path, MANIFEST)
    if not os.path.isdir(path):
        raise SlimjaxError(f"prepared directory '{path}' does not exist; make it with slimjax tokenize --out={path}")
    try:
        with open(where, encoding="utf-8") as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise SlimjaxError(f"'{path}' is not a prepared directory (no {MANIFEST}); make one with slimjax tokenize "
                           "--out=DIR") from None
    except (OSError, ValueError) as e:
        raise SlimjaxError(f"cannot read '{where}': {e}; make the directory again with slimjax tokenize") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or manifest.get("version") != VERSION:
        found = manifest.get("version") if isinstance(manifest, dict) else None
        raise SlimjaxError(f"'{where}' is not a {FORMAT} manifest of version {VERSION} (version {found}); make the "
                           "directory again with this slimjax's slimjax tokenize")
    return manifest


def check_matches(manifest: dict[str, Any], cfg: DataConfig, shards: int, path: str) -> None:
    """The prepared rows fit the run: same tokenizer, seq_len, packing and shard count."""
    def differs(what: str, made: Any, now: Any, fix: str) -> SlimjaxError:
        return SlimjaxError(f"prepared directory '{path}' was tokenized with {what}={made} but the config says {now}; "
                            f"{fix} or run slimjax tokenize again with this config")

    tok = manifest["tokenizer"]
    if tok["kind"] != cfg.tokenizer_kind:
        raise differs("data.tokenizer_kind", tok["kind"], cfg.tokenizer_kind,
                      f"set --config.data.tokenizer_kind={tok['kind']}")
    if cfg.tokenizer and tok["sha256"] and _sha256_or_error(cfg.tokenizer) != tok["sha256"]:
        raise SlimjaxError(f"data.tokenizer '{cfg.tokenizer}' is not the tokenizer prepared directory '{path}' was "
                           f"tokenized with (SHA-256 {tok['sha256'][:12]}...); set --config.data.tokenizer='' to use "
                           "the directory's own, or run slimjax tokenize again with this tokenizer")
    if manifest["seq_len"] != cfg.seq_len:
        raise differs("data.seq_len", manifest["seq_len"], cfg.seq_len, f"set --config.data.seq_len={manifest['seq_len']}")
    if manifest["packing"] != cfg.packing:
        raise differs("data.packing", manifest["packing"], cfg.packing, f"set --config.data.packing={manifest['packing']}")
    if manifest["shards"] != shards:
        raise differs("data shards", manifest["shards"], f"{shards} (data.shards, or train.global_batch_size when 0)",
                      f"set --config.data.shards={manifest['shards']}")


def _sha256_or_error(path: str) -> str:
    try:
        return _sha256(path)
    except OSError as e:
        raise SlimjaxError(f"data.tokenizer '{path}' cannot be read: {e.strerror}") from None


class RowFile(collections.abc.Sequence):
    """The packed rows of one ArrayRecord shard, read (and decoded) one at a time on demand.

    Opening checks the file's size and record count against the manifest, so a truncated or
    swapped file fails before step 1 rather than mid-run. Each thread reading (Grain's prefetch
    threads) gets a reader of its own, and a row is read as the range ``[i, i + 1)``: measured on
    a 100k-row file, the reader's index-list read (what ``ArrayRecordDataSource`` calls per row)
    slows with the file's length, about 1k rows/s, where a range read stays at tens of thousands."""

    def __init__(self, path: str, rows: int, size: int, width: int):
        actual = os.path.getsize(path) if os.path.isfile(path) else None
        if actual != size:
            state = "is missing" if actual is None else f"has {actual} bytes, the manifest says {size} (truncated?)"
            raise SlimjaxError(f"prepared shard '{path}' {state}; make the directory again with slimjax tokenize")
        self.path, self._rows, self._width = path, rows, width
        self._local = threading.local()
        count = self._reader().num_records()
        if count != rows:
            raise SlimjaxError(f"prepared shard '{path}' holds {count} rows, the manifest says {rows}; make the "
                               "directory again with slimjax tokenize")

    def _reader(self):
        reader = getattr(self._local, "reader", None)
        if reader is None:
            from array_record.python.array_record_module import ArrayRecordReader

            try:
                reader = ArrayRecordReader(self.path, "readahead_buffer_size:0")
            except Exception as e:  # the reader raises bare RuntimeErrors for a damaged file
                raise SlimjaxError(f"prepared shard '{self.path}' cannot be read ({type(e).__name__}: {e}); make "
                                   "the directory again with slimjax tokenize") from None
            self._local.reader = reader
        return reader

    def __len__(self) -> int:
        return self._rows

    def __getitem__(self, i):  # Grain asks for one row at a time
        i = int(i)
        return decode_row(self._reader().read(i, i + 1)[0], self._width)

    def take(self, indices: np.ndarray) -> dict[str, np.ndarray]:
        """Rows ``indices`` stacked into ``[len(indices), width]`` arrays."""
        rows = [self[i] for i in indices]
        return {f: np.stack([r[f] for r in rows]) for f in FIELDS}


class EvalBatches(collections.abc.Sequence):
    """This process's slices of the held-out batches, read from ``eval.array_record`` when asked for."""

    def __init__(self, rows: RowFile, global_batch: int, max_batches: int, process_index: int, process_count: int):
        self._rows = rows
        self._indices = pipeline.eval_indices(len(rows), global_batch, max_batches, process_index, process_count)

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, b):
        if isinstance(b, slice):
            return [self[i] for i in range(*b.indices(len(self)))]
        return pipeline.eval_batch(self._rows.take, len(self._rows), self._indices[b])


def prepared_source(cfg: DataConfig) -> SourceConfig:
    """The run's ``prepared`` source (config validation makes it the only one)."""
    return next(src for src in cfg.sources if src.kind == "prepared")


def load(cfg: DataConfig, global_batch: int, seed: int, max_eval_batches: int, vocab_size: int, workdir: str,
         process_index: int = 0, process_count: int = 1, pretrain: PretrainConfig | None = None) -> loader.Data:
    """:func:`loader.build` for a prepared directory: opens this process's shards, reads no row."""
    path = os.path.abspath(os.path.expanduser(prepared_source(cfg).path))
    if pretrain is not None:
        raise SlimjaxError(f"prepared directory '{path}' holds packed decoder rows; encoder pre-training cuts "
                           "sentence pairs from documents: give it the document sources instead")
    manifest = read_manifest(path)
    layout = loader.Layout.make(cfg, global_batch, process_index, process_count)
    check_matches(manifest, cfg, layout.shards, path)
    tok = _load_tokenizer(manifest, cfg, vocab_size, workdir, path)
    width = cfg.seq_len + 1
    srcs = manifest["sources"]
    shards = [[RowFile(os.path.join(path, shard_file(k, i)), s["rows"][i], s["bytes"][i], width)
               for k, s in enumerate(srcs)] for i in layout.owned]
    ev = manifest["eval"]
    eval_rows = RowFile(os.path.join(path, EVAL_FILE), ev["rows"], ev["bytes"], width)
    train = pipeline.train_dataset(shards, [s["weight"] for s in srcs], layout.rows_per_shard, seed,
                                   layout.owned.start)
    owned = slice(layout.owned.start, layout.owned.stop)
    return loader.Data(tok, train, EvalBatches(eval_rows, global_batch, max_eval_batches, process_index,
                                               process_count), {
        "sources": {s["name"]: {"documents": sum(s["documents"][owned]), "rows": sum(s["rows"][owned]),
                                "weight": s["weight"]} for s in srcs},
        "shards": layout.shards, "eval_documents": ev["documents"], "eval_rows": ev["rows"],
        "skipped": manifest["skipped"], "first_skipped": manifest["first_skipped"], "prepared": path,
    })


def _load_tokenizer(manifest: dict[str, Any], cfg: DataConfig, vocab_size: int, workdir: str, path: str
                    ) -> tokenizer.Tokenizer:
    """The directory's tokenizer (the one its rows were made with); a SentencePiece model is also
    cached in the workdir, as a run that trained its own would, for the commands that read a run."""
    meta = manifest["tokenizer"]
    file = os.path.join(path, meta["file"]) if meta["file"] else ""
    if file and _sha256_or_error(file) != meta["sha256"]:
        raise SlimjaxError(f"tokenizer file '{file}' does not match its manifest's SHA-256; make the directory "
                           "again with slimjax tokenize")
    tok = tokenizer.get_tokenizer(cfg.tokenizer_kind, file, workdir, vocab_size, cfg.tokenizer_type,
                                  lambda: iter(()))
    if cfg.tokenizer_kind == "sentencepiece" and not cfg.tokenizer:
        _cache_in_workdir(file, workdir)
    return tok


def _cache_in_workdir(file: str, workdir: str) -> None:
    cached = tokenizer.cached_model_path(workdir)
    model = open(file, "rb").read()
    if cached.exists():
        if cached.read_bytes() != model:
            raise SlimjaxError(f"the workdir's tokenizer '{cached}' is not the prepared directory's '{file}'; use a "
                               "new --workdir for a run on this directory")
        return
    cached.parent.mkdir(parents=True, exist_ok=True)
    tmp = cached.with_name(f"{cached.name}.{os.getpid()}.tmp")
    tmp.write_bytes(model)
    os.replace(tmp, cached)  # atomic: processes sharing the workdir never see half a model

