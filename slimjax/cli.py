"""The ``slimjax`` command. It parses flags and calls library functions; nothing more.

    slimjax train [--config=configs/tiny.py] [--config.train.steps=100 ...] [--workdir=runs/tiny]

Flags follow the absl + ml_collections conventions: ``--config`` names a Python file whose
``get_config()`` returns a ConfigDict (or the name of a bundled config, e.g. ``gpt2_small``) and
``--config.a.b=value`` overrides one key, typed like the value it replaces. Mistakes print one
line on stderr and exit with status 2.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import sys
from typing import Any, Sequence

import ml_collections

from slimjax.config import suggest
from slimjax.errors import SlimjaxError, one_line

COMMANDS = ("train",)
DEFAULT_CONFIG = "tiny"
USAGE = ("usage: slimjax train [--config=FILE_OR_NAME] [--config.KEY=VALUE ...] [--workdir=DIR]\n"
         "  default config: tiny; default workdir: runs/<config name>")


def bundled_config_path(name: str) -> str:
    """Path of a config shipped with slimjax (``tiny`` -> .../slimjax/configs/tiny.py)."""
    from slimjax import configs

    return os.path.join(os.path.dirname(configs.__file__), f"{name}.py")


def load_config_file(ref: str) -> ml_collections.ConfigDict:
    """Runs ``get_config()`` from a file path, or from a bundled config given by name."""
    path = ref if ref.endswith(".py") or os.sep in ref else bundled_config_path(ref)
    if not os.path.isfile(path):
        raise SlimjaxError(f"--config '{ref}' is not a file (nor a bundled config name such as "
                           f"'{DEFAULT_CONFIG}')")
    spec = importlib.util.spec_from_file_location(f"slimjax_config_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
        config = module.get_config()
    except AttributeError as e:
        raise SlimjaxError(f"config file '{path}' failed: {e} (it must define get_config())") from None
    except Exception as e:  # a user's config file can raise anything; report it in one line
        raise SlimjaxError(f"config file '{path}' failed: {type(e).__name__}: {e}") from None
    if not isinstance(config, ml_collections.ConfigDict):
        raise SlimjaxError(f"config file '{path}': get_config() must return an ml_collections.ConfigDict")
    return config


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
    """Sets ``config.<dotted>`` from its command-line text, typed like the current value."""
    node: Any = config
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        known = list(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        if part not in known:
            prefix = ".".join(parts[:depth])
            full = [f"{prefix}.{k}" if prefix else k for k in known]
            raise SlimjaxError(f"unknown config key '{dotted}'{suggest(dotted, full)}")
        if depth < len(parts) - 1:
            node = node[part]
    current = node[parts[-1]]
    try:
        node[parts[-1]] = parse_value(text, current)
    except (ValueError, SyntaxError, TypeError) as e:
        raise SlimjaxError(f"--config.{dotted}={text!r}: {e}") from None


def parse_value(text: str, current: Any) -> Any:
    """Converts flag text to the type of ``current`` (bool, int, float, str, tuple, None)."""
    if isinstance(current, bool):
        lowered = text.lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ValueError("expected true or false")
    if isinstance(current, int):
        return int(text)
    if isinstance(current, float):
        return float(text)
    if isinstance(current, str):
        return text
    if isinstance(current, (tuple, list)):
        value = ast.literal_eval(text) if text.strip().startswith(("(", "[")) else tuple(
            v.strip() for v in text.split(",") if v.strip())
        return tuple(value)
    return ast.literal_eval(text)


def parse_train_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
    """``--config``, ``--config.a.b=v`` (or ``--config.a.b v``) and ``--workdir`` -> (config, workdir)."""
    ref, workdir, overrides = DEFAULT_CONFIG, None, []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--"):
            raise SlimjaxError(f"unexpected argument '{arg}'; flags look like --config.train.steps=10")
        name, has_value, value = arg[2:].partition("=")
        if not has_value:
            if not args:
                raise SlimjaxError(f"flag --{name} needs a value")
            value = args.pop(0)
        if name == "config":
            ref = value
        elif name == "workdir":
            workdir = value
        elif name.startswith("config."):
            overrides.append((name[len("config."):], value))
        else:
            raise SlimjaxError(f"unknown flag --{name}{suggest(name, ['config', 'workdir'])}")
    config = load_config_file(ref)
    for dotted, value in overrides:
        apply_override(config, dotted, value)
    if workdir is None:
        workdir = os.path.join("runs", os.path.splitext(os.path.basename(ref))[0])
    return config, workdir


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``slimjax`` console script."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    try:
        if command not in COMMANDS:
            raise SlimjaxError(f"unknown command '{command}'{suggest(command, COMMANDS)}; commands: "
                               f"{', '.join(COMMANDS)}")
        config, workdir = parse_train_args(rest)
        import slimjax

        summary = slimjax.train(config, workdir)
    except SlimjaxError as e:
        print(f"slimjax: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    print(f"done: step {summary['final_step']}, train loss {summary['final_train_loss']:.4f}, "
          f"eval loss {summary['final_eval_loss']:.4f}, {summary['tokens_per_s']:,.0f} tokens/s, "
          f"MFU {summary['mfu']:.1%} -> {os.path.abspath(workdir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
