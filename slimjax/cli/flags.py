"""The config conventions of every command that takes a config, and numeric flag values.

Flags follow the absl + ml_collections conventions: ``--config`` names a Python file whose
``get_config()`` returns a ConfigDict (or the name of a bundled config, e.g. ``gpt2_small``) and
``--config.a.b=value`` (or ``--config.a.b value``) overrides one key, typed like the value it
replaces.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from typing import Any

import ml_collections

from slimjax.config import suggest
from slimjax.errors import SlimjaxError

DEFAULT_CONFIG = "tiny"


def bundled_config_path(name: str) -> str:
    """Path of a config shipped with slimjax (``tiny`` -> .../slimjax/configs/tiny.py)."""
    from slimjax import configs

    return os.path.join(os.path.dirname(configs.__file__), f"{name}.py")


def bundled_configs() -> list[str]:
    """Names of the configs shipped with slimjax (``tiny``, ``gpt2_small`` ...)."""
    folder = os.path.dirname(bundled_config_path(DEFAULT_CONFIG))
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


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


def number_flag(name: str, text: str, kind: type = int, minimum: float | None = None) -> Any:
    """``--name=text`` as an int (or ``kind``), at least ``minimum``; else a one-line SlimjaxError."""
    try:
        value = kind(text)
    except ValueError:
        raise SlimjaxError(f"--{name}={text!r} must be {'an integer' if kind is int else 'a number'}") from None
    if minimum is not None and value < minimum:
        raise SlimjaxError(f"--{name}={value} must be >= {minimum}")
    return value


def check_new_dir(path: str, flag: str = "--out") -> str:
    """The absolute path of a run directory a command is about to write: new or empty, else an error."""
    out = os.path.abspath(os.path.expanduser(path))
    if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
        raise SlimjaxError(f"{flag} '{path}' already exists and is not an empty directory; give a new directory")
    return out
