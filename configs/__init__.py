"""Experiment configs: each module's ``get_config()`` returns an ``ml_collections.ConfigDict``.

Installed as ``slimjax.configs`` (see pyproject.toml), so ``from slimjax.configs import base``
works both from a checkout and from an installed wheel.
"""

import importlib
import pkgutil


def __getattr__(name: str):
    """``slimjax.configs.tiny`` without importing it first (``import slimjax; slimjax.configs.tiny``)."""
    if name in {m.name for m in pkgutil.iter_modules(__path__)}:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
