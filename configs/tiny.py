"""The embedded default: a ~1M-parameter Llama-style model on Shakespeare, minutes on a 2-core CPU."""

import ml_collections

from slimjax.configs import base


def get_config() -> ml_collections.ConfigDict:
    # base.py already describes the tiny model; this file names it so `slimjax train` has a default.
    return base.get_config()
