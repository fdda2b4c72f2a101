"""``slimjax tokenize``: a run's sources tokenized and packed ahead of training into ArrayRecord
shards (a *prepared directory*), which ``slimjax train`` then reads with
``--config.data.sources=prepared:DIR``."""

from __future__ import annotations

import os
from typing import Sequence

from slimjax.cli.command import Command, Flag, text

COMMAND = Command("tokenize", "tokenize and pack the configured sources into ArrayRecord shards for training", (
    Flag("out", "the new prepared directory (manifest.json, tokenizer/, train/, eval.array_record)", metavar="DIR",
         required=True),
    Flag("runner", "local (this process) or an Apache Beam runner: direct, prism, dataflow, flink, spark "
         "(one worker per file read and per shard written; the same bytes)", text, "local", "NAME"),
    Flag("beam_options", "Beam pipeline options passed through unchanged, e.g. '--project=P --region=R'", text, "",
         "FLAGS"),
), details="Rows are split into the logical shards of the run's data.shards (0: train.global_batch_size) exactly as "
           "slimjax train would split them, with data.seq_len, data.packing and the tokenizer (data.tokenizer_kind; "
           "an untrained SentencePiece model is trained on the training documents and stored in the directory). "
           "Train on it with --config.data.sources=prepared:DIR and the same seq_len, packing, shards and "
           "tokenizer kind.", config=True)


def run(argv: Sequence[str]) -> int:
    args = COMMAND.parse(argv)
    from slimjax.config import validate
    from slimjax.data import tokenized

    cfg = validate(args.config)
    manifest = tokenized.write(cfg.data, cfg.train.global_batch_size, cfg.model.vocab_size, args.out, args.runner,
                               args.beam_options)
    rows = sum(sum(s["rows"]) for s in manifest["sources"])
    print(f"wrote {os.path.abspath(args.out)}: {rows:,} rows of {manifest['seq_len']} tokens "
          f"({manifest['tokens']:,} tokens) from {', '.join(s['name'] for s in manifest['sources'])} in "
          f"{manifest['shards']} shards, {manifest['eval']['rows']:,} held-out rows")
    return 0
