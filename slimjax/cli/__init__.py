"""The ``slimjax`` command: a table of subcommands, each of which parses flags and calls the library.

A ``SlimjaxError`` from any command prints one line on stderr and exits with status 2.
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from slimjax.cli import compress, distill, evaluate, export, generate, hf_import, prepare, prune, quantize, report, tokenizer, train
from slimjax.config import suggest
from slimjax.errors import SlimjaxError, one_line

# name -> (handler(argv) -> exit status, one-line usage)
COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "train": (train.run, train.USAGE),
    "prepare": (prepare.run, prepare.USAGE),
    "tokenizer": (tokenizer.run, tokenizer.USAGE),
    "import": (hf_import.run, hf_import.USAGE),
    "export": (export.run, export.USAGE),
    "eval": (evaluate.run, evaluate.USAGE),
    "generate": (generate.run, generate.USAGE),
    "prune": (prune.run, prune.USAGE),
    "quantize": (quantize.run, quantize.USAGE),
    "report": (report.run, report.USAGE),
    "distill": (distill.run, distill.USAGE),
    "compress": (compress.run, compress.USAGE),
}


def usage() -> str:
    return "usage:\n" + "\n".join(f"  {u}" for _, u in COMMANDS.values())


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slimjax`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise SlimjaxError(f"unknown command '{command}'{suggest(command, COMMANDS)}; commands: "
                               f"{', '.join(COMMANDS)}")
        return COMMANDS[command][0](rest)
    except SlimjaxError as e:
        print(f"slimjax: error: {one_line(str(e))}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
