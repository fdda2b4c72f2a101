"""Builds a run's data from ``DataConfig``: sources -> transforms -> tokenizer -> packing ->
this process's shards -> a Grain dataset of local batches, plus the held-out batches.

Each process reads and tokenizes only the records of its own logical shards (see
``pipeline``); held-out documents are read by every process, since each evaluates its slice of
every held-out batch. A SentencePiece tokenizer that must be trained is trained on every
training document, so all processes train the same one.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any, Callable, Iterator

import grain
import numpy as np

from slimjax.config import DataConfig, SourceConfig
from slimjax.data import pipeline, sources, text, tokenizer
from slimjax.data.packing import PackedRows, pack_concat_split, pack_first_fit
from slimjax.errors import SlimjaxError


@dataclasses.dataclass
class Data:
    """A run's data: the tokenizer, this process's endless local batches and the held-out batches."""

    tokenizer: tokenizer.Tokenizer
    train: grain.MapDataset
    eval: list[dict[str, np.ndarray]]
    stats: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Layout:
    """How the global batch is split: ``shards`` logical shards, this process owning ``owned``."""

    shards: int
    owned: range
    rows_per_shard: int

    @classmethod
    def make(cls, cfg: DataConfig, global_batch: int, process_index: int, process_count: int) -> Layout:
        n = cfg.shards or global_batch
        if n % process_count:
            raise SlimjaxError(f"data.shards={n} is not divisible by the {process_count} processes; "
                               "pick a multiple of the process count")
        per = n // process_count
        return cls(n, range(process_index * per, (process_index + 1) * per), global_batch // n)

    def shard_of(self, key: sources.Key) -> int:
        return (key[0] + key[1]) % self.shards


def expand(srcs: tuple[SourceConfig, ...]) -> list[SourceConfig]:
    """Sources with the ``slimpajama`` preset replaced by its seven weighted RedPajama sets."""
    out = []
    for src in srcs:
        if src.kind != "slimpajama":
            out.append(src)
            continue
        for set_name, share in sources.SLIMPAJAMA_MIXTURE.items():
            out.append(dataclasses.replace(src, kind="jsonl", set_name=set_name, weight=src.weight * share))
    return out


def held_out(src: SourceConfig, key: sources.Key, fraction: float) -> bool:
    """A stable ``fraction`` of each source's records, chosen by key (the same for every process)."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{src.kind}|{src.path}|{key[0]}|{key[1]}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def documents(cfg: DataConfig, src: SourceConfig, split: str, want: Callable[[sources.Key], bool],
              stats: sources.ReadStats) -> Iterator[tuple[sources.Key, str]]:
    """(key, transformed text) of ``src``'s records in ``split`` that ``want`` keeps and the filters pass."""
    own_eval = sources.has_own_eval(src)

    def keep(key: sources.Key) -> bool:
        if not own_eval and held_out(src, key, cfg.eval_fraction) != (split == "eval"):
            return False
        return want(key)

    unit_list = sources.units(src, split, cfg.eval_plays)
    for record in sources.read(src, unit_list, keep, cfg.strict, stats):
        doc = text.nfc(record.text) if cfg.nfc else record.text
        if doc and not text.too_short(doc, cfg.min_doc_chars):
            yield record.key, doc


def training_documents(cfg: DataConfig) -> Iterator[str]:
    """Every training document of every source (all shards): what a tokenizer is trained on."""
    for src in expand(cfg.sources):
        for _, doc in documents(cfg, src, "train", lambda key: True, sources.ReadStats()):
            yield doc


def split_documents(cfg: DataConfig, split: str) -> list[str]:
    """Every document of ``split`` ("train" or "eval") of every source, in a fixed order."""
    stats = sources.ReadStats()
    return [doc for src in expand(cfg.sources) for _, doc in documents(cfg, src, split, lambda key: True, stats)]


def pack(cfg: DataConfig, tok: tokenizer.Tokenizer, docs: list[str], pad_last: bool = False) -> PackedRows:
    """Tokenized (BOS ... EOS) documents packed by the configured packer."""
    encoded = tokenizer.encode_documents(tok, docs)
    if cfg.packing == "first_fit":
        return pack_first_fit(encoded, cfg.seq_len, pad_id=tok.pad_id)
    return pack_concat_split(encoded, cfg.seq_len, pad_last=pad_last, pad_id=tok.pad_id)


def build(cfg: DataConfig, global_batch: int, seed: int, max_eval_batches: int, vocab_size: int,
          workdir: str, process_index: int = 0, process_count: int = 1) -> Data:
    """Everything the training loop reads. Raises SlimjaxError for any problem with the data."""
    srcs = expand(cfg.sources)
    layout = Layout.make(cfg, global_batch, process_index, process_count)
    stats = sources.ReadStats()
    owned = set(layout.owned)
    # docs[i][k]: documents of this process's i-th shard from source k
    docs: list[list[list[str]]] = [[[] for _ in srcs] for _ in layout.owned]
    for k, src in enumerate(srcs):
        for key, doc in documents(cfg, src, "train", lambda key: layout.shard_of(key) in owned, stats):
            docs[layout.shard_of(key) - layout.owned.start][k].append(doc)
    eval_docs = [doc for src in srcs for _, doc in documents(cfg, src, "eval", lambda key: True, stats)]

    if not eval_docs:
        raise SlimjaxError("no held-out documents to evaluate on: set data.eval_fraction > 0 or give a "
                           "source an eval_path")
    tok = tokenizer.get_tokenizer(cfg.tokenizer_kind, cfg.tokenizer, workdir, vocab_size, cfg.tokenizer_type,
                                  lambda: training_documents(cfg))
    shards = []
    for i, per_source in enumerate(docs):
        shard_rows = []
        for src, source_docs in zip(srcs, per_source):
            rows = pack(cfg, tok, source_docs)
            if len(rows) == 0:
                raise SlimjaxError(
                    f"data source '{src.name}' gives no rows of data.seq_len={cfg.seq_len} in shard "
                    f"{layout.owned.start + i} of {layout.shards} ({len(source_docs)} documents); it is too "
                    "small for that many shards: lower data.shards or drop the source")
            shard_rows.append(rows)
        shards.append(shard_rows)
    eval_rows = pack(cfg, tok, eval_docs, pad_last=True)
    train = pipeline.train_dataset(shards, [s.weight for s in srcs], layout.rows_per_shard, seed,
                                   layout.owned.start)
    eval_data = pipeline.eval_batches(eval_rows, global_batch, max_eval_batches, process_index, process_count)
    return Data(tok, train, eval_data, {
        "sources": {s.name: {"documents": sum(len(d[k]) for d in docs), "rows": sum(len(sh[k]) for sh in shards),
                             "weight": s.weight} for k, s in enumerate(srcs)},
        "shards": layout.shards, "eval_documents": len(eval_docs), "eval_rows": len(eval_rows),
        "skipped": dict(stats.skipped), "first_skipped": stats.first,
    })
