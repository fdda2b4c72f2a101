"""Builds a run's data from ``DataConfig``: sources -> transforms -> tokenizer -> packing ->
this process's shards -> a Grain dataset of local batches, plus the held-out batches.

Each process reads and tokenizes only the records of its own logical shards (see
``pipeline``); held-out documents are read by every process, since each evaluates its slice of
every held-out batch. A SentencePiece tokenizer that must be trained is trained on every
training document, so all processes train the same one.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
from typing import Any, Callable, Iterator, Sequence

import grain
import numpy as np

from slimjax.config import DataConfig, PretrainConfig, SourceConfig
from slimjax.data import mlm, pipeline, sources, text, tokenizer
from slimjax.data.packing import PackedRows, pack_concat_split, pack_first_fit
from slimjax.errors import SlimjaxError


@dataclasses.dataclass
class Data:
    """A run's data: the tokenizer, this process's endless local batches and the held-out batches."""

    tokenizer: tokenizer.Tokenizer
    train: grain.MapDataset
    eval: list[dict[str, np.ndarray]]
    stats: dict[str, Any]


# The named arrays of each model family's training batches.
BATCH_SPECS: dict[str, pipeline.BatchSpec] = {"decoder": pipeline.LM_BATCH, "encoder": mlm.ENCODER_BATCH}


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
    """Sources with the ``slimpajama`` preset replaced by its seven weighted RedPajama sets (each
    still of kind ``slimpajama``, so a record without a set name is named by its set directory)."""
    out = []
    for src in srcs:
        if src.kind != "slimpajama":
            out.append(src)
            continue
        for set_name, share in sources.SLIMPAJAMA_MIXTURE.items():
            out.append(dataclasses.replace(src, set_name=set_name, weight=src.weight * share))
    return out


def is_prepared(cfg: DataConfig) -> bool:
    """Whether the run reads rows tokenized ahead (a ``prepared`` source, always the only one)."""
    return any(src.kind == "prepared" for src in cfg.sources)


def held_out(unit_name: str, record: int, fraction: float) -> bool:
    """A stable ``fraction`` of a source's records, chosen by the record's unit name and index.

    The unit name is the file's path below the glob's fixed prefix (``sources.unit_names``), not
    where the corpus lives, so a corpus moved or spelled differently (``./data/*.txt``, another
    mount) splits alike. A content hash would do too, but deciding would then mean reading every
    record, where a name decides before a file is opened (each process opens only its own files).
    """
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{unit_name}|{record}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") < fraction * 2**64


def documents(cfg: DataConfig, src: SourceConfig, split: str, want: Callable[[sources.Key], bool],
              stats: sources.ReadStats) -> Iterator[tuple[sources.Key, str]]:
    """(key, transformed text) of ``src``'s records in ``split`` that ``want`` keeps and the filters
    pass, in key order; records the filters drop are counted in ``stats`` ("empty", "shorter than ...")."""
    unit_list = sources.units(src, split, cfg.eval_plays)
    yield from unit_documents(cfg, src, split, unit_list, range(len(unit_list)), want, stats)


def unit_documents(cfg: DataConfig, src: SourceConfig, split: str, unit_list: list[str], ids: Sequence[int],
                   want: Callable[[sources.Key], bool], stats: sources.ReadStats) -> Iterator[tuple[sources.Key, str]]:
    """:func:`documents` of the units ``ids`` of ``unit_list`` (``sources.units``) only: what one
    worker of a distributed runner reads."""
    chosen = [unit_list[u] for u in ids]
    names = None if sources.has_own_eval(src) else dict(zip(ids, sources.unit_names(src, chosen)))

    def keep(key: sources.Key) -> bool:
        if names is not None and held_out(names[key[0]], key[1], cfg.eval_fraction) != (split == "eval"):
            return False
        return want(key)

    short = f"shorter than data.min_doc_chars={cfg.min_doc_chars}"
    for record in sources.read(src, chosen, keep, cfg.strict, stats, list(ids)):
        doc = text.nfc(record.text) if cfg.nfc else record.text
        if not doc:
            stats.drop("empty", record.where)
        elif text.too_short(doc, cfg.min_doc_chars):
            stats.drop(short, record.where)
        else:
            yield record.key, doc


def no_documents(cfg: DataConfig, src: SourceConfig, split: str, stats: sources.ReadStats | None = None
                 ) -> SlimjaxError | None:
    """The error for ``src`` yielding no usable documents in ``split``, with what was dropped and
    why; None if it does yield some. Without ``stats`` (those of a read of the whole split), the
    split is read again: this runs on the failure path only."""
    if stats is None:
        stats = sources.ReadStats()
        if any(True for _ in documents(cfg, src, split, lambda key: True, stats)):
            return None
    own = split == "eval" and src.eval_path
    glob_ = src.eval_path if own else src.path
    if src.kind == "slimpajama" and (error := _missing_sets(src, split, glob_, cfg.eval_plays)):
        return error
    name = (f"data source '{sources.describe(src)}': its eval_path '{src.eval_path}'" if own
            else f"data source '{sources.describe(src)}'")
    held = (f" besides the data.eval_fraction={cfg.eval_fraction} held out"
            if split == "train" and not sources.has_own_eval(src) and cfg.eval_fraction > 0 else "")
    skipped = ", ".join(f"{n} {reason} (first: {stats.first[reason]})" for reason, n in stats.skipped.items())
    return SlimjaxError(f"{name} yields no usable {split} documents: "
                        f"{f'skipped {skipped}' if skipped else 'no records'}{held}; fix or drop the source")


def _missing_sets(src: SourceConfig, split: str, glob_: str, eval_plays: tuple[str, ...]) -> SlimjaxError | None:
    """For one set of the slimpajama preset that yields nothing: the error when the files' records
    (which do parse) name no RedPajama set at all, or not this one; None otherwise."""
    every = dataclasses.replace(src, set_name="")
    found = collections.Counter(str(r.meta.get(sources.SET_NAME_KEY) or "(none)")
                                for r in sources.read(every, sources.units(every, split, eval_plays)))
    if not found:
        return None  # nothing parses: the reasons are the skipped counts
    preset = f"data source '{sources.describe(every)}'"
    if not set(found) & set(sources.SLIMPAJAMA_MIXTURE):
        seen = ", ".join(f"{n} ({c})" for n, c in found.most_common(5))
        return SlimjaxError(
            f"{preset}: no documents with a RedPajama set name under '{glob_}' (meta.{sources.SET_NAME_KEY} or "
            f"a RedPajama set directory; set names found: {seen}); the slimpajama preset keeps only the seven "
            "RedPajama sets: use kind 'jsonl' to train on every record")
    if src.set_name and not found[src.set_name]:
        return SlimjaxError(
            f"{preset}: no {src.set_name} documents under '{glob_}' (sets found: {', '.join(sorted(found))}); "
            "the slimpajama preset mixes all seven RedPajama sets: for another mixture list 'jsonl' sources "
            "with a set_name each")
    return None


def no_held_out(cfg: DataConfig) -> SlimjaxError:
    """The error for a run without held-out documents: where each configured source's would have
    come from (the slimpajama preset as one source: its eval_path read for any set)."""
    why = []
    for src in cfg.sources:
        whole = dataclasses.replace(src, set_name="") if src.kind == "slimpajama" else src
        if src.kind == "shakespeare":
            why.append(f"'{src.name}': data.eval_plays={cfg.eval_plays}")
        elif src.eval_path:
            error = no_documents(cfg, whole, "eval") or _missing_sets(whole, "eval", src.eval_path, cfg.eval_plays)
            why.append(str(error))
        elif cfg.eval_fraction > 0:
            why.append(f"'{sources.describe(src)}': data.eval_fraction={cfg.eval_fraction} of its documents "
                       "selects none (raise data.eval_fraction or give it an eval_path)")
        else:
            why.append(f"'{sources.describe(src)}': data.eval_fraction is 0 and it has no eval_path")
    return SlimjaxError(f"no held-out documents to evaluate on: {'; '.join(why)}")


def training_documents(cfg: DataConfig) -> Iterator[str]:
    """Every training document of every source (all shards): what a tokenizer is trained on.
    A source that yields none is a SlimjaxError naming it."""
    for src in expand(cfg.sources):
        stats = sources.ReadStats()
        n = 0
        for _, doc in documents(cfg, src, "train", lambda key: True, stats):
            n += 1
            yield doc
        if not n:
            raise no_documents(cfg, src, "train", stats)


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


def per_shard(cfg: DataConfig, srcs: list[SourceConfig], docs: list[list[list[str]]], layout: Layout,
              make: Callable[[list[str]], Any], what: str) -> list[list[Any]]:
    """``make(documents)`` (packed rows, sentence-pair pieces) for each source in each of this
    process's shards; a source that gives none in a shard is an error naming it."""
    return [[nonempty(cfg, src, make(source_docs), layout.owned.start + i, layout.shards, len(source_docs), what)
             for src, source_docs in zip(srcs, per_source)] for i, per_source in enumerate(docs)]


def nonempty(cfg: DataConfig, src: SourceConfig, made: Any, shard: int, shards: int, n_docs: int, what: str) -> Any:
    """``made`` (one source's rows in one shard) if it holds any; else the error naming the source."""
    if len(made) == 0:
        raise SlimjaxError(
            f"data source '{src.name}' gives no {what} of data.seq_len={cfg.seq_len} in shard {shard} of "
            f"{shards} ({n_docs} documents); it is too small for that many shards: lower data.shards or drop "
            "the source")
    return made


def build(cfg: DataConfig, global_batch: int, seed: int, max_eval_batches: int, vocab_size: int,
          workdir: str, process_index: int = 0, process_count: int = 1, pretrain: PretrainConfig | None = None
          ) -> Data:
    """Everything the training loop reads. Raises SlimjaxError for any problem with the data.

    With ``pretrain`` (an encoder run) the rows are sentence pairs with masked tokens
    (``slimjax.data.mlm``) instead of packed documents. A ``prepared`` source (rows tokenized ahead
    by ``slimjax tokenize``) is read from its ArrayRecord shards instead (``slimjax.data.tokenized``)."""
    if is_prepared(cfg):
        from slimjax.data import tokenized  # it builds on this module: imported here, not at the top

        return tokenized.load(cfg, global_batch, seed, max_eval_batches, vocab_size, workdir, process_index,
                              process_count, pretrain)
    srcs = expand(cfg.sources)
    layout = Layout.make(cfg, global_batch, process_index, process_count)
    stats = sources.ReadStats()
    owned = set(layout.owned)
    # docs[i][k]: documents of this process's i-th shard from source k
    docs: list[list[list[str]]] = [[[] for _ in srcs] for _ in layout.owned]
    for k, src in enumerate(srcs):
        for key, doc in documents(cfg, src, "train", lambda key: layout.shard_of(key) in owned, stats):
            docs[layout.shard_of(key) - layout.owned.start][k].append(doc)
        # Checked before the tokenizer is trained on nothing; a source that yields documents only in
        # other processes' shards is reported below as too small for the shards.
        if not any(shard[k] for shard in docs) and (error := no_documents(cfg, src, "train")):
            raise error
    eval_docs = [doc for src in srcs for _, doc in documents(cfg, src, "eval", lambda key: True, stats)]
    if not eval_docs:
        raise no_held_out(cfg)
    tok = tokenizer.get_tokenizer(cfg.tokenizer_kind, cfg.tokenizer, workdir, vocab_size, cfg.tokenizer_type,
                                  lambda: training_documents(cfg))
    if pretrain is not None:
        return _encoder_data(cfg, pretrain, tok, srcs, docs, eval_docs, layout, global_batch, seed,
                             max_eval_batches, vocab_size, process_index, process_count, stats)
    shards = per_shard(cfg, srcs, docs, layout, lambda d: pack(cfg, tok, d), "rows")
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


@dataclasses.dataclass(frozen=True)
class PairRows:
    """How documents become encoder rows: the tokenizer, the special ids, the word table (whole-word
    masking) and the piece length (half a row after [CLS] and two [SEP])."""

    tok: tokenizer.Tokenizer
    specials: mlm.Specials
    words: np.ndarray | None
    piece_len: int

    def pieces(self, docs: list[str] | Sequence[str]) -> mlm.Pieces:
        return mlm.cut_pieces(self.tok.encode_batch(list(docs)), self.piece_len)


def pair_rows(cfg: DataConfig, pretrain: PretrainConfig, tok: tokenizer.Tokenizer, vocab_size: int) -> PairRows:
    """The :class:`PairRows` of a config; SlimjaxError for rows too short for a pair or bad special ids."""
    piece_len = (cfg.seq_len - 3) // 2
    if piece_len < 1:
        raise SlimjaxError(f"data.seq_len={cfg.seq_len} leaves no room for a sentence pair ([CLS] A [SEP] B [SEP]); "
                           "raise it to at least 5")
    words = mlm.word_table(tok) if pretrain.whole_word else None
    return PairRows(tok, mlm.specials_of(tok, pretrain, vocab_size), words, piece_len)


def _encoder_data(cfg: DataConfig, pretrain: PretrainConfig, tok: tokenizer.Tokenizer, srcs: list[SourceConfig],
                  docs: list[list[list[str]]], eval_docs: list[str], layout: Layout, global_batch: int, seed: int,
                  max_eval_batches: int, vocab_size: int, process_index: int, process_count: int,
                  stats: sources.ReadStats) -> Data:
    """:func:`build` for the encoder: each shard's documents cut into sentence-pair pieces."""
    rows = pair_rows(cfg, pretrain, tok, vocab_size)
    shards = per_shard(cfg, srcs, docs, layout, rows.pieces, "sentence pairs")
    eval_pieces = rows.pieces(eval_docs)
    if len(eval_pieces) == 0:
        raise SlimjaxError(f"the {len(eval_docs)} held-out documents give no sentence pairs of "
                           f"data.seq_len={cfg.seq_len}; hold out longer documents")
    train = mlm.train_dataset(shards, [s.weight for s in srcs], layout.rows_per_shard, seed, layout.owned.start,
                              cfg.seq_len, pretrain, rows.specials, rows.words)
    eval_data = mlm.eval_batches(eval_pieces, global_batch, max_eval_batches, seed, cfg.seq_len, pretrain,
                                 rows.specials, rows.words, process_index, process_count)
    return Data(tok, train, eval_data, {
        "sources": {s.name: {"documents": sum(len(d[k]) for d in docs), "pairs": sum(len(sh[k]) for sh in shards),
                             "weight": s.weight} for k, s in enumerate(srcs)},
        "shards": layout.shards, "eval_documents": len(eval_docs), "eval_pairs": len(eval_pieces),
        "skipped": dict(stats.skipped), "first_skipped": stats.first,
    })
