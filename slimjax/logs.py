"""Library log noise off by default: Orbax, JAX and absl log at INFO through absl's handler (and
``absl.app.run`` turns INFO on), ~100 lines per run that say nothing a user acts on.

``quiet_logging()`` raises those loggers to WARNING; it is called when slimjax is imported and
again when a run starts (after ``absl.app`` has set its own verbosity). To see them while
debugging, set ``SLIMJAX_LOG_LEVEL=INFO`` (or DEBUG).
"""

from __future__ import annotations

import logging
import os

LOG_LEVEL_ENV = "SLIMJAX_LOG_LEVEL"
NOISY = ("absl", "jax", "orbax", "jax._src.xla_bridge")


def quiet_logging() -> None:
    """Sets absl's verbosity and the noisy libraries' loggers to WARNING (or ``$SLIMJAX_LOG_LEVEL``)."""
    from absl import logging as absl_logging

    name = os.environ.get(LOG_LEVEL_ENV, "WARNING").upper()
    level = logging.getLevelName(name)
    if not isinstance(level, int):
        level, name = logging.WARNING, "WARNING"
    absl_logging.set_verbosity(name.lower())
    for logger in NOISY:
        logging.getLogger(logger).setLevel(level)
