"""``slimjax prepare``: SlimPajama-style cleaning and global near-duplicate removal into
SlimPajama-layout ``jsonl.zst`` shards, with a report."""

from __future__ import annotations

import dataclasses
import os
import typing
from typing import Any, Sequence

from slimjax.cli.flags import iter_flags
from slimjax.config import parse_source, suggest
from slimjax.errors import SlimjaxError

USAGE = ("slimjax prepare --source=SPEC [--source=SPEC ...] --out=DIR [--threshold=0.8] [--verify] "
         "[--no-dedup] [--min_chars=200] [--heldout=0.01] [--workers=N] [--strict] [--bands=B --rows=R]"
         "   (SPEC: stdlib, shakespeare, text:GLOB, jsonl:GLOB, slimpajama:GLOB, tfds:NAME)")


def parse(argv: Sequence[str]):
    """Flags -> ``PrepareOptions``; ``--flag`` alone sets a boolean, ``--no-flag`` clears it."""
    from slimjax.data.prepare import PrepareOptions

    hints = typing.get_type_hints(PrepareOptions)
    fields = [f.name for f in dataclasses.fields(PrepareOptions)]
    values: dict[str, Any] = {"sources": []}
    switches = frozenset(n for f in fields if hints[f] is bool for n in (f, f"no_{f}", f"no-{f}"))
    for name, value in iter_flags(argv, switches, example="--source=stdlib"):
        name = name.replace("-", "_")
        if value is None:  # --verify, --no_dedup
            values[name.removeprefix("no_")] = not name.startswith("no_")
            continue
        if name != "source" and (name not in fields or name == "sources"):
            raise SlimjaxError(f"unknown flag --{name}{suggest(name, ['source', *fields[1:]])}")
        if name == "source":
            values["sources"].append(parse_source(f"--source[{len(values['sources'])}]", value))
        else:
            values[name] = _typed(name, value, hints[name])
    if "out" not in values:
        raise SlimjaxError(f"slimjax prepare needs --out=DIR; usage: {USAGE}")
    values["sources"] = tuple(values["sources"])
    return PrepareOptions(**values)


def _typed(name: str, text: str, hint: Any) -> Any:
    try:
        if hint is bool:
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError("expected true or false")
            return text.lower() in ("true", "1", "yes")
        return hint(text)
    except ValueError as e:
        raise SlimjaxError(f"--{name}={text!r}: {e}") from None


def run(argv: Sequence[str]) -> int:
    opts = parse(argv)
    from slimjax.data.prepare import prepare, report

    result = prepare(opts)
    print(report.table(result))
    print(f"wrote {os.path.abspath(opts.out)} (report.json inside)")
    return 0
