"""``slimjax prepare``: SlimPajama-style cleaning and global near-duplicate removal into
SlimPajama-layout ``jsonl.zst`` shards, with a report."""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Sequence

from slimjax.cli.command import Command, Flag, boolean, integer, number, text
from slimjax.cli.keydocs import field_docs
from slimjax.config import parse_source
from slimjax.data.prepare import PrepareOptions

# Every PrepareOptions field is a flag, with the field's comment as its help; a bool is a switch
# (--verify, --no-dedup) so the options and the command cannot drift apart.
_PARSERS = {int: (integer(), "N"), float: (number(), "X"), bool: (boolean, "true|false")}
_HINTS = typing.get_type_hints(PrepareOptions)
_DOCS = field_docs(PrepareOptions)

COMMAND = Command("prepare", "clean and near-deduplicate corpora into SlimPajama-layout jsonl.zst shards", (
    Flag("source", "a corpus: stdlib, shakespeare, text:GLOB, jsonl:GLOB, slimpajama:GLOB, tfds:NAME", metavar="SPEC",
         repeated=True, required=True),
    Flag("out", "the new output directory (report.json inside)", metavar="DIR", required=True),
    *(Flag(f.name, _DOCS[f.name], parse, f.default, metavar, switch=hint is bool, negatable=hint is bool)
      for f in dataclasses.fields(PrepareOptions) if f.name not in ("sources", "out")
      for hint in [_HINTS[f.name]] for parse, metavar in [_PARSERS.get(hint, (text, "VALUE"))]),
))


def parse(argv: Sequence[str]) -> PrepareOptions:
    """Flags -> ``PrepareOptions``."""
    args = vars(COMMAND.parse(argv))
    sources = tuple(parse_source(f"--source[{i}]", spec) for i, spec in enumerate(args.pop("source")))
    return PrepareOptions(sources=sources, **args)


def run(argv: Sequence[str]) -> int:
    opts = parse(argv)
    from slimjax.data.prepare import prepare, report

    result = prepare(opts)
    print(report.table(result))
    print(f"wrote {os.path.abspath(opts.out)} (report.json inside)")
    return 0
