"""``slimjax tokenize --runner=direct|prism|dataflow|flink|spark``: the training shards of a
prepared directory (``slimjax.data.tokenized``) written by an Apache Beam pipeline.

Per source, one element per document unit (a file; a TFDS split): read its documents with their
keys (``loader.unit_documents``, the local reader and filters) -> key each by its logical shard
(``Layout.shard_of``) -> group per (source, shard) -> sort by key, the order the local path reads
them in -> :func:`tokenized.write_shard` (pack, write the shard's file, count). The counts and the
read statistics travel back to the driver, which checks them and writes the manifest as the local
path does; the tokenizer is trained or copied by the driver beforehand and read by each worker
from the output directory, which must therefore be visible to every worker (as the sources).
"""

from __future__ import annotations

from typing import Any, Iterator

from slimjax.config import DataConfig, SourceConfig
from slimjax.data import beam_runner, loader, sources, tokenized, tokenizer


def shards(cfg: DataConfig, srcs: list[SourceConfig], layout: loader.Layout, vocab_size: int,
           tok_meta: dict[str, Any], root: str, runner: str, options: Any, stats: sources.ReadStats
           ) -> dict[tuple[int, int], dict[str, Any]]:
    """Writes every (source, shard)'s file under ``root`` on Beam; returns ``{(source, shard): counts}``
    (a shard no document fell into has none) and adds the reads' skipped records to ``stats`` in
    the order the local path meets them."""
    units = [sources.units(src, "train", cfg.eval_plays) for src in srcs]
    beam_runner.run(runner, options, lambda p: _build(p, cfg, srcs, units, layout, vocab_size, tok_meta, root))
    got = beam_runner.gathered(root)
    for _, (skipped, first) in sorted(got["stats"], key=lambda s: s[0]):  # by (source, unit): the local read order
        stats.merge(sources.ReadStats(skipped, first))
    return dict(got["counts"])


def _build(p, cfg: DataConfig, srcs: list[SourceConfig], units: list[list[str]], layout: loader.Layout,
           vocab_size: int, tok_meta: dict[str, Any], root: str) -> None:
    beam = beam_runner.beam()
    read = (p | "units" >> beam.Create([(k, u) for k, unit_list in enumerate(units) for u in range(len(unit_list))])
            | "spread" >> beam.Reshuffle()
            | "read" >> beam.FlatMap(_read, cfg=cfg, srcs=srcs, units=units, layout=layout
                                     ).with_outputs("stats", main="documents"))
    counts = (read.documents | "per shard" >> beam.GroupByKey()
              | "pack and write" >> beam.Map(_write_shard, cfg=cfg, vocab_size=vocab_size, tok_meta=tok_meta,
                                             root=root))
    beam_runner.gather(p, root, counts=counts | "counts" >> beam.combiners.ToList(),
                       stats=read.stats | "stats" >> beam.combiners.ToList())


def _read(element: tuple[int, int], cfg: DataConfig, srcs: list[SourceConfig], units: list[list[str]],
          layout: loader.Layout) -> Iterator[Any]:
    """One unit's documents as ``((source, shard), (key, text))``, then its read statistics,
    tagged ``stats``, as ``((source, unit), (skipped, first))``."""
    from apache_beam import pvalue

    k, u = element
    stats = sources.ReadStats()
    for key, doc in loader.unit_documents(cfg, srcs[k], "train", units[k], [u], lambda key: True, stats):
        yield (k, layout.shard_of(key)), (key, doc)
    yield pvalue.TaggedOutput("stats", ((k, u), (stats.skipped, stats.first)))


def _write_shard(element, cfg: DataConfig, vocab_size: int, tok_meta: dict[str, Any], root: str
                 ) -> tuple[tuple[int, int], dict[str, Any]]:
    """One (source, shard)'s documents, sorted by key -> :func:`tokenized.write_shard`."""
    (k, i), keyed_docs = element
    tok = _tokenizer(cfg, vocab_size, tok_meta, root)
    return (k, i), tokenized.write_shard(cfg, tok, k, i, sorted(keyed_docs, key=lambda kd: kd[0]), root)


_TOKENIZERS: dict[tuple[str, str], tokenizer.Tokenizer] = {}  # per worker process: loaded once, not per shard


def _tokenizer(cfg: DataConfig, vocab_size: int, tok_meta: dict[str, Any], root: str) -> tokenizer.Tokenizer:
    """The driver's tokenizer, from the copy it put in the output directory."""
    file = f"{root}/{tok_meta['file']}" if tok_meta["file"] else ""
    if (root, file) not in _TOKENIZERS:
        _TOKENIZERS[root, file] = tokenizer.get_tokenizer(cfg.tokenizer_kind, file, root, vocab_size,
                                                         cfg.tokenizer_type, lambda: iter(()))
    return _TOKENIZERS[root, file]
