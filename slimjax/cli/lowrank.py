"""``slimjax lowrank``: one-shot low-rank factorisation of a run's checkpoint into a new run directory.

Each targeted kernel W becomes ``u @ v`` from a truncated SVD (``--method=whitened``: of W
whitened by the calibration inputs' second moment, as SVD-LLM, which minimises the layer's output
error instead of the weights'), with ranks from ``--rank``, ``--energy`` (retained spectral
energy per layer) or ``--budget`` (the fraction of the targeted layers' parameters kept). Layers
where a rank would not store fewer parameters stay dense. The new run (recipe ``('lowrank',)``)
trains, checkpoints, resumes, samples and exports (``u @ v`` multiplied back) like any run;
recover quality with ``slimjax train --config=OUT/config.py`` or ``slimjax distill --student=OUT``.

Everything is checked and computed before OUT is created; a failure leaves nothing behind.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from typing import Sequence

from slimjax.cli.command import Command, Flag, boolean, choice, integer, number
from slimjax.cli.flags import check_new_dir
from slimjax.errors import SlimjaxError

REPORT_FILE = "lowrank.json"
RECOVER_DOC = """A factorised run ({what}).

Recover (fine-tune the factors):
  slimjax train --config={path} --workdir=NEW_RUN --config.train.steps=N
or distil from the original: slimjax distill --teacher=ORIGINAL --student=THIS_RUN --out=NEW_RUN
"""

COMMAND = Command("lowrank", "one-shot low-rank factorisation (SVD, SVD-LLM whitening) into a new run directory", (
    Flag("workdir", "the run to factorise", metavar="RUN", required=True),
    Flag("out", "the new run directory", metavar="NEW_RUN", required=True),
    Flag("method", "'svd' (truncated SVD of W) or 'whitened' (of W whitened by the calibration inputs)",
         choice("svd", "whitened"), "svd", metavar="METHOD"),
    Flag("rank", "one rank for every targeted layer", integer(1), metavar="R"),
    Flag("energy", "per layer the smallest rank keeping this fraction of the squared singular values",
         number(), metavar="E"),
    Flag("budget", "keep at most this fraction of the targeted layers' parameters (ranks chosen greedily)",
         number(), metavar="F"),
    Flag("target", "regex on per-layer kernel paths (default: every block projection)", metavar="REGEX",
         repeated=True),
    Flag("calibration_samples", "calibration rows from the run's training data (whitening; error report)",
         integer(0), 128, metavar="N"),
    Flag("damp", "whitened: diagonal damping of the Gram matrix, a fraction of its mean diagonal", number(0.0), 0.01,
         metavar="D"),
    Flag("calibrate", "with --method=svd: also report each layer's output error on calibration rows", boolean,
         False, "true|false", switch=True),
    Flag("step", "checkpoint step (default: the latest)", integer(0), metavar="N"),
), details="Give exactly one of --rank, --energy and --budget.")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Flags -> options, checked before anything is read."""
    v = COMMAND.parse(argv)
    if sum(x is not None for x in (v.rank, v.energy, v.budget)) != 1:
        raise SlimjaxError("slimjax lowrank needs exactly one of --rank=R, --energy=E and --budget=F")
    check_new_dir(v.out)
    return v


def run(argv: Sequence[str]) -> int:
    v = parse(argv)
    import jax

    from slimjax.cli.rundir import open_run, write_run
    from slimjax.slim import calibrate
    from slimjax.slim.factorize import FactorizeOptions, check_options, factorize, matrices_of

    targets = tuple(v.target) or FactorizeOptions().targets
    opts = FactorizeOptions(v.method, targets, v.rank, v.energy, v.budget, v.damp)
    rd = open_run(v.workdir, v.step)
    names = [name for name, _ in rd.spec.recipe]
    if names:
        raise SlimjaxError(f"run '{v.workdir}' has slim recipe {names}; factorise a plain model (slimjax export "
                           "bakes LoRA, pruning and distillation into plain weights)")
    calibrated = v.method == "whitened" or v.calibrate
    check_options(opts, matrices_of(rd.spec, targets), [None] if calibrated else [])  # before any heavy work
    log = lambda msg: print(f"slimjax lowrank: {msg}", flush=True) if jax.process_index() == 0 else None  # noqa: E731
    batches = []
    if calibrated:
        batches = calibrate.calibration_batches(rd.cfg, rd.workdir, v.calibration_samples)
    spec, params, summary = factorize(rd.spec, rd.restore_params(), opts, rd.mesh, rd.rules, batches, progress=log)
    lowrank = dict(spec.recipe[-1][1])
    lowrank_cfg = dataclasses.replace(rd.cfg.slim.lowrank, targets=tuple(lowrank["targets"]), rank=lowrank["rank"],
                                      ranks=tuple(lowrank["ranks"]))
    cfg = dataclasses.replace(rd.cfg, slim=dataclasses.replace(rd.cfg.slim, recipe=("lowrank",), lowrank=lowrank_cfg))
    summary = {"source": rd.workdir, "source_step": rd.step, "calibration_samples": len(batches) and v.calibration_samples,
               "options": dataclasses.asdict(opts), **summary}
    write_run(rd, v.out, cfg, spec, params, None, summary, kind="lowrank", report_file=REPORT_FILE, doc=RECOVER_DOC)
    if jax.process_index() == 0:
        print(summary["line"] + f" -> {os.path.abspath(v.out)}")
    return 0
