"""How a ``slimjax`` subcommand declares its flags, parses them and prints ``--help``.

A command is a ``Command`` holding a tuple of ``Flag`` (name, help, value parser, default, ...);
``Command.parse(argv)`` returns an ``argparse.Namespace`` with one attribute per flag (plus
``config`` / ``config_ref`` for commands that take a config, ``action`` for commands with
sub-actions). Flags are parsed by ``argparse`` (without prefix abbreviations, which would make
``--temp`` silently mean ``--temperature``); every mistake becomes a one-line ``SlimjaxError``
that names the flag as typed and, for an unknown flag, the nearest flag of *this* command.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import re
import textwrap
from typing import Any, Callable, Sequence

from slimjax.cli import flags, keydocs
from slimjax.config import suggest
from slimjax.errors import SlimjaxError

HELP = ("-h", "--help")
CONFIG_PREFIX = "--config."
WIDTH = 100  # help paragraphs are wrapped to this many columns


def text(name: str, value: str) -> str:
    """A flag's value as given."""
    return value


def integer(minimum: int | None = None) -> Callable[[str, str], int]:
    """Parses an integer of at least ``minimum``; the error names the flag."""
    return lambda name, value: flags.number_flag(name, value, int, minimum)


def number(minimum: float | None = None) -> Callable[[str, str], float]:
    """Parses a float of at least ``minimum``; the error names the flag."""
    return lambda name, value: flags.number_flag(name, value, float, minimum)


def boolean(name: str, value: str) -> bool:
    """``true``/``false`` (also ``1``/``0``, ``yes``/``no``), like ``--config`` booleans."""
    try:
        return flags.parse_value(value, False)
    except ValueError:
        raise SlimjaxError(f"--{name}={value!r} must be true or false") from None


_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


def size_bytes(name: str, value: str) -> int:
    """A size in bytes: ``80GB``, ``16GiB``, ``1.5e9`` (decimal units KB..TB, binary KiB..TiB)."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([a-zA-Z]*)\s*", value)
    if not m or m.group(2).lower() not in _UNITS or float(m.group(1)) <= 0:
        raise SlimjaxError(f"--{name}={value!r} is not a size; write e.g. 16GiB, 80GB or 17179869184")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def choice(*options: str) -> Callable[[str, str], str]:
    """One of ``options``; anything else is an error listing them."""
    def parse(name: str, value: str) -> str:
        if value not in options:
            raise SlimjaxError(f"--{name}={value!r} is not one of {', '.join(options)}{suggest(value, options)}")
        return value
    return parse


@dataclasses.dataclass(frozen=True)
class Flag:
    """One flag: ``--name=VALUE`` or ``--name VALUE``, its value converted by ``parse(name, text)``.

    ``repeated``: may be given several times; the value is the list, in order (``[]`` if never).
    ``switch``: a bare ``--name`` means ``const``; ``--name=VALUE`` still goes through ``parse``.
    ``negatable``: ``--no-name`` (or ``--no_name``) sets ``False``.
    """

    name: str
    help: str
    parse: Callable[[str, str], Any] = text
    default: Any = None
    metavar: str = "VALUE"
    required: bool = False
    repeated: bool = False
    switch: bool = False
    const: Any = True
    negatable: bool = False

    @property
    def names(self) -> list[str]:
        """The flag as a user types it, then its negations."""
        return [f"--{self.name}"] + ([f"--no-{self.name}", f"--no_{self.name}"] if self.negatable else [])

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        # argparse %-formats help strings; the default is shown unless it says nothing.
        shown = "" if self.default in (None, False, "") else f" (default: {self.default})"
        note = " (required)" if self.required else " (repeatable)" if self.repeated else ""
        kwargs: dict[str, Any] = {"dest": self.name, "metavar": self.metavar,
                                  "help": (self.help + shown + note).replace("%", "%%"),
                                  "type": lambda value: self.parse(self.name, value)}
        if self.repeated:
            kwargs.update(action="append", default=None)
        else:
            kwargs.update(default=self.default)
        if self.switch:
            kwargs.update(nargs="?", const=self.const)
        parser.add_argument(self.names[0], **kwargs)
        if self.negatable:
            parser.add_argument(*self.names[1:], dest=self.name, action="store_false",
                                help=f"same as --{self.name}=false")


class FlagParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one-line ``SlimjaxError``s, never an exit."""

    def __init__(self, prog: str, description: str, epilog: str):
        super().__init__(prog=prog, description=description, epilog=epilog, add_help=False, allow_abbrev=False,
                         exit_on_error=False, formatter_class=argparse.RawDescriptionHelpFormatter)

    def error(self, message: str):
        raise SlimjaxError(f"{self.prog}: {message}; see {self.prog} --help")


@dataclasses.dataclass(frozen=True)
class Command:
    """A subcommand: its name, a one-line summary, its flags and an optional longer description.

    ``config``: also takes ``--config=FILE_OR_NAME`` and ``--config.KEY=VALUE`` overrides (the
    namespace then has ``config``, the overridden ConfigDict, and ``config_ref``).
    ``actions``: the sub-actions that must come first (``slimjax tokenizer train``).
    """

    name: str
    summary: str
    flags: tuple[Flag, ...]
    details: str = ""
    config: bool = False
    actions: tuple[str, ...] = ()

    @property
    def prog(self) -> str:
        return f"slimjax {self.name}"

    def parser(self, config_help: str = "") -> FlagParser:
        details = textwrap.fill(" ".join(self.details.split()), WIDTH)
        description = "\n\n".join(p for p in (self.summary, details) if p)
        parser = FlagParser(self.prog, description, config_help)
        if self.actions:
            parser.add_argument("action", metavar="|".join(self.actions), help="what to do")
        if self.config:
            parser.add_argument("--config", metavar="FILE_OR_NAME", default=flags.DEFAULT_CONFIG,
                                help=f"Python file whose get_config() returns a ConfigDict, or a bundled config "
                                     f"({', '.join(flags.bundled_configs())}) (default: {flags.DEFAULT_CONFIG}); "
                                     "--config.KEY=VALUE (or --config.KEY VALUE) then sets one key, typed like its "
                                     "value (keys below)")
        for flag in self.flags:
            flag.add_to(parser)
        parser.add_argument(*HELP, action="store_true", default=argparse.SUPPRESS, help="print this help and exit")
        return parser

    def parse(self, argv: Sequence[str]) -> argparse.Namespace:
        """The flags of ``argv`` -> a namespace; any mistake is a one-line ``SlimjaxError``."""
        argv, overrides = split_overrides(argv) if self.config else (list(argv), [])
        parser = self.parser()
        if self.actions:
            self._check_action(argv)
        try:
            args, extra = parser.parse_known_args(argv)
        except argparse.ArgumentError as e:
            raise SlimjaxError(_message(self.prog, e)) from None
        if extra:
            raise SlimjaxError(_unknown(self.prog, extra[0], self.option_names()))
        for flag in self.flags:
            if flag.repeated and getattr(args, flag.name) is None:
                setattr(args, flag.name, [])
            if flag.required and getattr(args, flag.name) in (None, "", []):
                raise SlimjaxError(f"{self.prog} needs --{flag.name}={flag.metavar}; see {self.prog} --help")
        if self.config:
            args.config_ref = args.config
            args.config = flags.load_config_file(args.config_ref)
            for dotted, value in overrides:
                flags.apply_override(args.config, dotted, value)
        return args

    def option_names(self) -> list[str]:
        """Every flag as typed (``--workdir``, ``--no-dedup`` ...), for suggestions."""
        return (["--config"] if self.config else []) + [name for flag in self.flags for name in flag.names]

    def _check_action(self, argv: Sequence[str]) -> None:
        # Named before any flag is looked at: `slimjax tokenizer fit --out=x` is about "fit".
        given = argv[0] if argv else None
        if given is None or given.startswith("-"):
            raise SlimjaxError(f"{self.prog} needs an action first: {', '.join(self.actions)} "
                               f"(e.g. {self.prog} {self.actions[0]} ...)")
        if given not in self.actions:
            raise SlimjaxError(f"unknown action '{given}' for {self.prog}{suggest(given, self.actions)}; "
                               f"actions: {', '.join(self.actions)}")

    def help(self, argv: Sequence[str] = ()) -> str:
        """The ``--help`` text: flags with help and defaults; with a config, every config key with
        its value (from the ``--config`` in ``argv``, default ``tiny``) and its comment in base.py."""
        config_help = ""
        if self.config:
            ref = config_ref(argv)
            config_help = (f"config keys (--config.KEY=VALUE; values of --config={ref}, comments from "
                           f"configs/base.py):\n{keydocs.config_table(flags.load_config_file(ref), base_docs())}")
        return self.parser(config_help).format_help()


def wants_help(argv: Sequence[str]) -> bool:
    """Whether ``-h`` / ``--help`` is among the arguments (it wins over everything else)."""
    return any(arg in HELP for arg in argv)


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
    """(the other arguments, [(dotted key, text)]) for ``--config.a.b=v`` and ``--config.a.b v``."""
    rest, overrides = [], []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith(CONFIG_PREFIX):
            rest.append(arg)
            continue
        name, has_value, value = arg.partition("=")
        if not has_value:
            if not args:
                raise SlimjaxError(f"flag {name} needs a value ({name}=VALUE)")
            value = args.pop(0)
        overrides.append((name[len(CONFIG_PREFIX):], value))
    return rest, overrides


def config_ref(argv: Sequence[str]) -> str:
    """The last ``--config=REF`` (or ``--config REF``) in ``argv``; the default config otherwise."""
    ref = flags.DEFAULT_CONFIG
    for i, arg in enumerate(argv):
        if arg.startswith("--config="):
            ref = arg.partition("=")[2]
        elif arg == "--config" and i + 1 < len(argv):
            ref = argv[i + 1]
    return ref


def base_docs() -> dict[str, str]:
    """Config key -> its comment in configs/base.py."""
    from slimjax.configs import base

    return keydocs.config_docs(inspect.getsource(base))


def _unknown(prog: str, arg: str, known: Sequence[str]) -> str:
    if not arg.startswith("-"):
        return f"unexpected argument '{arg}' to {prog}; flags look like --name=value (see {prog} --help)"
    name = arg.partition("=")[0]
    return f"unknown flag {name}{suggest(name, known)}; {prog} --help lists its flags"


def _message(prog: str, error: argparse.ArgumentError) -> str:
    """argparse's complaint about one flag, in slimjax's words where it has them."""
    flag = error.argument_name or prog
    if error.message.startswith("expected one argument"):
        return f"flag {flag} needs a value ({flag}=VALUE)"
    if error.message.startswith("ignored explicit argument"):
        return f"flag {flag} takes no value; give {flag} alone"
    return f"{flag}: {error.message}"


def describe(commands: dict[str, Command]) -> str:
    """``slimjax --help``: one line per command."""
    width = max(map(len, commands))
    lines = [f"  {name:<{width}}  {command.summary}" for name, command in commands.items()]
    return ("usage: slimjax COMMAND [FLAGS ...]   (slimjax COMMAND --help lists a command's flags)\n\ncommands:\n"
            + "\n".join(lines))
