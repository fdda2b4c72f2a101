"""``slimjax tokenizer train``: a SentencePiece model trained on the configured sources' training documents."""

from __future__ import annotations

import os
from typing import Sequence

from slimjax.cli.flags import parse_config_args
from slimjax.errors import SlimjaxError

USAGE = ("slimjax tokenizer train --out=FILE.model [--config=FILE_OR_NAME] [--config.KEY=VALUE ...]"
         "   (sources: data.sources; size: model.vocab_size; algorithm: data.tokenizer_type)")


def run(argv: Sequence[str]) -> int:
    if not argv or argv[0] != "train":
        raise SlimjaxError(f"usage: {USAGE}")
    config, _, values = parse_config_args(argv[1:], extra=("out",))
    out = values.get("out")
    if not out:
        raise SlimjaxError("slimjax tokenizer train needs --out=FILE.model")
    if os.path.exists(out):
        raise SlimjaxError(f"--out '{out}' already exists; give a new file name")
    from slimjax.config import validate
    from slimjax.data import loader, tokenizer

    cfg = validate(config)
    tok = tokenizer.train_sentencepiece(loader.training_documents(cfg.data), cfg.model.vocab_size,
                                        cfg.data.tokenizer_type, out)
    print(f"wrote {os.path.abspath(out)}: {tok.vocab_size} pieces ({cfg.data.tokenizer_type}) from "
          f"{', '.join(s.name for s in cfg.data.sources)}")
    return 0
