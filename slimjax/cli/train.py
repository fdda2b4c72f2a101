"""``slimjax train``: parse config flags, call ``slimjax.train``, print a one-line result.

``slimjax.train`` joins a multi-process run first (``distributed.`` config keys, SLURM or Cloud
TPU); every process runs the same command and process 0 prints the result.
"""

from __future__ import annotations

import os
import sys
from typing import Sequence

import ml_collections

from slimjax.cli.command import Command, Flag

COMMAND = Command("train", "train a model from a config; a second run on the same --workdir resumes it", (
    Flag("workdir", "run directory: checkpoints, metrics, summary (default: runs/<config name>); resumes from its "
         "latest checkpoint", metavar="DIR"),
), details="On SIGTERM a checkpoint is saved and the command exits with status 143.", config=True)


def parse(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, str]:
    """Flags of ``slimjax train`` -> (config, workdir); the workdir defaults to runs/<config name>."""
    args = COMMAND.parse(argv)
    return args.config, args.workdir or os.path.join("runs", os.path.splitext(os.path.basename(args.config_ref))[0])


def run(argv: Sequence[str]) -> int:
    config, workdir = parse(argv)
    import jax

    import slimjax
    from slimjax.errors import Preempted

    try:
        summary = slimjax.train(config, workdir)
    except Preempted as e:
        print(f"slimjax: {e}", file=sys.stderr)
        return Preempted.EXIT_STATUS
    if jax.process_index() == 0 and not summary.get("already_complete"):  # one line per run, not one per host
        print(f"done: step {summary['final_step']}, train loss {summary['final_train_loss']:.4f}, "
              f"eval loss {summary['final_eval_loss']:.4f}, {summary['tokens_per_s']:,.0f} tokens/s, "
              f"MFU {summary['mfu']:.1%}{_pipeline_note(summary.get('pipeline'))} -> {os.path.abspath(workdir)}")
    return 0


def _pipeline_note(pipeline: dict | None) -> str:
    """', pipeline bubble 27%' for a pipelined run (the share of stage time spent idle)."""
    return "" if not pipeline else f", {pipeline['schedule']} pipeline bubble {pipeline['bubble_fraction']:.0%}"
