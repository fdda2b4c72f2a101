"""``slimjax train``: parse config flags, call ``slimjax.train``, print a one-line result.

``slimjax.train`` joins a multi-process run first (``distributed.`` config keys, SLURM or Cloud
TPU); every process runs the same command and process 0 prints the result.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

from slimjax.cli.flags import parse_train_args

USAGE = ("slimjax train [--config=FILE_OR_NAME] [--config.KEY=VALUE ...] [--workdir=DIR]"
         "   (default config: tiny; default workdir: runs/<config name>; resumes from DIR's checkpoints;"
         " on SIGTERM saves a checkpoint and exits 143)")


def run(argv: Sequence[str]) -> int:
    config, workdir = parse_train_args(argv)
    import jax

    import slimjax
    from slimjax.errors import Preempted

    try:
        summary = slimjax.train(config, workdir)
    except Preempted as e:
        print(f"slimjax: {e}", file=sys.stderr)
        return Preempted.EXIT_STATUS
    if jax.process_index() == 0:  # one line per run, not one per host
        print(f"done: step {summary['final_step']}, train loss {summary['final_train_loss']:.4f}, "
              f"eval loss {summary['final_eval_loss']:.4f}, {summary['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {summary['mfu']:.1%} -> {os.path.abspath(workdir)}")
    return 0
