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

# Every PrepareOptions field is a flag with the field's comment as its help, so the options and the
# command cannot drift apart; a bool is a switch (--verify, --no-dedup).
_PARSERS = {int: (integer(), "N"), float: (number(), "X"), bool: (boolean, "true|false")}


def _option_flags() -> list[Flag]:
    hints, docs = typing.get_type_hints(PrepareOptions), field_docs(PrepareOptions)
    made = []
    for field in dataclasses.fields(PrepareOptions):
        if field.name in ("sources", "out"):  # --source is repeated and parsed; --out is required
            continue
        parse, metavar = _PARSERS.get(hints[field.name], (text, "VALUE"))
        switch = hints[field.name] is bool
        made.append(Flag(field.name, docs[field.name], parse, field.default, metavar, switch=switch, negatable=switch))
    return made


COMMAND = Command("prepare", "clean and near-deduplicate corpora into SlimPajama-layout jsonl.zst shards", (
    Flag("source", "a corpus: stdlib, shakespeare, text:GLOB, jsonl:GLOB, slimpajama:GLOB, tfds:NAME", metavar="SPEC",
         repeated=True, required=True),
    Flag("out", "the new output directory (report.json inside)", metavar="DIR", required=True),
    *_option_flags(),
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
