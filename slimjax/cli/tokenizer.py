"""``slimjax tokenizer train``: a SentencePiece model trained on the configured sources' training documents."""

from __future__ import annotations

import os
from typing import Sequence

from slimjax.cli.command import Command, Flag
from slimjax.errors import SlimjaxError

COMMAND = Command("tokenizer", "train a SentencePiece tokenizer on the configured sources", (
    Flag("out", "the new .model file", metavar="FILE.model", required=True),
), details="Sources: data.sources; size: model.vocab_size; algorithm: data.tokenizer_type.", config=True,
    actions=("train",))


def run(argv: Sequence[str]) -> int:
    args = COMMAND.parse(argv)
    if os.path.exists(args.out):
        raise SlimjaxError(f"--out '{args.out}' already exists; give a new file name")
    from slimjax.config import validate
    from slimjax.data import loader, tokenizer

    cfg = validate(args.config)
    tok = tokenizer.train_sentencepiece(loader.training_documents(cfg.data), cfg.model.vocab_size,
                                        cfg.data.tokenizer_type, args.out)
    print(f"wrote {os.path.abspath(args.out)}: {tok.vocab_size} pieces ({cfg.data.tokenizer_type}) from "
          f"{', '.join(s.name for s in cfg.data.sources)}")
    return 0
