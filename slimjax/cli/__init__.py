"""The ``slimjax`` command: a table of subcommands, each of which parses flags and calls the library.

A ``SlimjaxError`` from any command prints one line on stderr and exits with status 2;
``slimjax CMD --help`` prints the command's flags (``slimjax --help``: the commands).
"""

from __future__ import annotations

import sys
from typing import Callable, Sequence

from slimjax.cli import (compress, distill, evaluate, explain, export, generate, hf_import, lowrank, prepare, prune,
                         quantize, report, tokenize, tokenizer, train)
from slimjax.cli.command import HELP, Command, describe, wants_help
from slimjax.config import suggest
from slimjax.errors import SlimjaxError, one_line

# name -> (handler(argv) -> exit status, the command's flags)
COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], Command]] = {
    module.COMMAND.name: (module.run, module.COMMAND)
    for module in (train, prepare, tokenize, tokenizer, hf_import, export, evaluate, generate, prune, quantize, lowrank, report,
                   distill, compress, explain)
}


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slimjax`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP:
        overview = describe({name: command for name, (_, command) in COMMANDS.items()})
        print(overview, file=sys.stdout if argv else sys.stderr)  # no arguments is a mistake: usage on stderr
        return 0 if argv else 2
    try:
        return dispatch(argv[0], argv[1:])
    except SlimjaxError as e:
        print(f"slimjax: error: {one_line(str(e))}", file=sys.stderr)
        return 2


def dispatch(command: str, rest: Sequence[str]) -> int:
    """Runs one command on its flags (or prints its help); a user's mistake raises SlimjaxError."""
    if command not in COMMANDS:
        raise SlimjaxError(f"unknown command '{command}'{suggest(command, COMMANDS)}; commands: "
                           f"{', '.join(COMMANDS)}")
    handler, flags = COMMANDS[command]
    if wants_help(rest):
        print(flags.help(rest))
        return 0
    return handler(list(rest))


if __name__ == "__main__":
    sys.exit(main())
