"""Experiment configs: each module's ``get_config()`` returns an ``ml_collections.ConfigDict``.

Installed as ``slimjax.configs`` (see pyproject.toml), so ``from slimjax.configs import base``
works both from a checkout and from an installed wheel.
"""
