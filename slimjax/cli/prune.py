"""``slimjax prune``: one-shot pruning of a run's checkpoint into a new run directory.

Unstructured (magnitude, Wanda, SparseGPT; ``--nm=2:4`` for N:M) keeps the model's shapes: the
new run holds the parameters with pruned weights at zero and the masks as the pruning
transform's state (``slim.recipe=('prune',)``), so ``slimjax train --config=OUT/config.py``
fine-tunes with the masks fixed (recovery) and eval, generate, report and export read it like any
run. Structured pruning (``--heads``, ``--mlp``) removes whole attention heads (kv groups under
GQA) and MLP neurons: the new run is a smaller dense model.

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

REPORT_FILE = "prune.json"
RECOVER_DOC = """A pruned run ({what}).

Recover (fine-tune with the masks fixed):
  slimjax train --config={path} --workdir=NEW_RUN --config.train.steps=N
"""
# Unstructured flags default to None so that giving any of them with --heads/--mlp is caught.
UNSTRUCTURED = {"method": "magnitude", "sparsity": 0.5, "nm": None, "scope": "layer"}


def _nm(name: str, text: str) -> tuple[int, int]:
    n, sep, m = text.partition(":")
    if not sep or not n.isdigit() or not m.isdigit() or not 0 < int(n) < int(m):
        raise SlimjaxError(f"--{name}={text!r} must look like N:M with 0 < N < M (e.g. 2:4: two of every four inputs "
                           "kept)")
    return int(n), int(m)


COMMAND = Command("prune", "one-shot pruning of a run's checkpoint into a new run directory", (
    Flag("workdir", "the run to prune", metavar="RUN", required=True),
    Flag("out", "the new run directory", metavar="NEW_RUN", required=True),
    Flag("method", "unstructured criterion (default: magnitude; wanda and sparsegpt calibrate)",
         choice("magnitude", "wanda", "sparsegpt"), metavar="METHOD"),
    Flag("sparsity", "fraction of targeted weights set to zero (default: 0.5)", number(), metavar="F"),
    Flag("nm", "N:M sparsity instead: N of every M consecutive inputs kept (e.g. 2:4)", _nm, metavar="N:M"),
    Flag("scope", "'layer' (each matrix at the sparsity) or 'global' (one magnitude threshold; default: layer)",
         choice("layer", "global"), metavar="SCOPE"),
    Flag("target", "regex on per-layer kernel paths (default: every block projection)", metavar="REGEX",
         repeated=True),
    Flag("calibration_samples", "calibration rows from the run's training data", integer(0), 128, metavar="N"),
    Flag("heads", "structured: fraction of attention heads (kv groups under GQA) removed per layer", number(), 0.0,
         metavar="F"),
    Flag("mlp", "structured: fraction of MLP neurons removed per layer", number(), 0.0, metavar="F"),
    Flag("sequential", "calibrate each block with the earlier blocks already pruned", boolean, True,
         metavar="true|false"),
    Flag("step", "checkpoint step (default: the latest)", integer(0), metavar="N"),
), details="""
    Unstructured pruning keeps the model's shapes: the new run holds the pruned weights at zero and
    the masks (slim.recipe=('prune',)), so slimjax train --config=OUT/config.py fine-tunes with the
    masks fixed. Structured pruning (--heads, --mlp) writes a smaller dense model. Nothing is
    written unless everything succeeds.""")


def parse(argv: Sequence[str]) -> argparse.Namespace:
    """Flags -> options, checked before anything is read."""
    v = COMMAND.parse(argv)
    for name in ("heads", "mlp"):
        if not 0.0 <= getattr(v, name) < 1.0:
            raise SlimjaxError(f"--{name}={getattr(v, name)} must lie in [0, 1): the fraction removed from every layer")
    v.structured = bool(v.heads or v.mlp)
    if v.structured and any(getattr(v, name) is not None for name in UNSTRUCTURED):
        raise SlimjaxError("--heads/--mlp (structured) and --method/--sparsity/--nm/--scope (unstructured) are "
                           "separate runs of slimjax prune; give one kind")
    for name, default in UNSTRUCTURED.items():
        if getattr(v, name) is None:
            setattr(v, name, default)
    check_new_dir(v.out)
    return v


def run(argv: Sequence[str]) -> int:
    v = parse(argv)
    import jax

    from slimjax.cli.rundir import open_run, write_run
    from slimjax.slim import calibrate
    from slimjax.slim.oneshot import OneShotOptions, default_prune_config

    rd = open_run(v.workdir, v.step)
    names = [name for name, _ in rd.spec.recipe]
    if names not in ([], ["prune"]):
        raise SlimjaxError(f"run '{v.workdir}' has slim recipe {names}; prune a plain or pruned model (export "
                           "LoRA runs first: slimjax export merges adapters)")
    targets = tuple(v.target) or default_prune_config().targets
    opts = OneShotOptions(v.method, v.sparsity, v.nm, v.scope, targets, v.sequential)
    log = lambda msg: print(f"slimjax prune: {msg}", flush=True) if jax.process_index() == 0 else None  # noqa: E731
    params = rd.restore_params()
    batches = []
    if v.structured or opts.calibrated:
        batches = calibrate.calibration_batches(rd.cfg, rd.workdir, v.calibration_samples)
    if v.structured:
        cfg, spec, params, slim, summary = _structured(rd, params, batches, v)
    else:
        cfg, spec, params, slim, summary = _unstructured(rd, params, batches, opts, log)
    summary = {"source": rd.workdir, "source_step": rd.step,
               "calibration_samples": v.calibration_samples if batches else 0, **summary}
    write_run(rd, v.out, cfg, spec, params, slim, summary, kind="prune", report_file=REPORT_FILE, doc=RECOVER_DOC)
    if jax.process_index() == 0:
        print(summary["line"] + f" -> {os.path.abspath(v.out)}")
    return 0


def _unstructured(rd, params, batches, opts, log):
    import jax
    import jax.numpy as jnp

    from slimjax.slim.oneshot import prune_oneshot
    from slimjax.slim.prune import MASKS, _nest

    base_spec = dataclasses.replace(rd.spec, recipe=())
    pruned, masks, layers = prune_oneshot(base_spec, params, opts, rd.mesh, rd.rules, batches, progress=log)
    if rd.spec.recipe:  # already pruned: the old masks stay in force
        old = rd.checkpointer.restore_slim(rd.step, jax.eval_shape(lambda: {"prune": {MASKS: _nest(masks)}}))
        if old:
            from slimjax.slim.prune import _flat

            prev = _flat(old["prune"][MASKS])
            masks = {p: m & prev[p] if p in prev else m for p, m in masks.items()}
    prune_cfg = dataclasses.replace(rd.cfg.slim.prune, targets=opts.targets, schedule="fixed")
    cfg = dataclasses.replace(rd.cfg, slim=dataclasses.replace(rd.cfg.slim, recipe=("prune",), prune=prune_cfg))
    from slimjax.slim.spec import spec_from_config

    spec = spec_from_config(cfg)
    spec = dataclasses.replace(spec, model=rd.spec.model)
    kept = sum(int(jnp.sum(m)) for m in masks.values())
    total = sum(int(m.size) for m in masks.values())
    method = opts.method + (f" {opts.nm[0]}:{opts.nm[1]}" if opts.nm else f" {opts.sparsity:.0%}")
    line = f"pruned {len(layers)} layer matrices with {method}: {1 - kept / total:.2%} of {total:,} weights removed"
    summary = {"kind": "unstructured", "options": dataclasses.asdict(opts), "targeted_weights": total,
               "kept_weights": kept, "sparsity": 1 - kept / total, "layers": layers, "line": line}
    return cfg, spec, pruned, {"prune": {MASKS: _nest(masks)}}, summary


def _structured(rd, params, batches, v):
    import jax

    from slimjax.slim import calibrate
    from slimjax.slim.spec import ModelSpec, build
    from slimjax.slim.structured import structured_prune

    patterns = ["attn/wo$", "mlp/down$"]
    stats = calibrate.collect_stats(rd.spec, params, batches, rd.mesh, rd.rules, patterns, gram=False)
    model, small, detail = structured_prune(rd.spec.model, params, stats, v.heads, v.mlp)
    cfg = dataclasses.replace(rd.cfg, model=model)
    spec = ModelSpec(rd.spec.family, model)
    built = build(spec)
    small = jax.device_put(small, rd.rules.tree_shardings(built.axes, built.shapes, rd.mesh))
    n_before = sum(int(x.size) for x in jax.tree.leaves(params))
    n_after = sum(int(x.size) for x in jax.tree.leaves(small))
    line = (f"removed {v.heads:.0%} of heads ({rd.spec.model.n_heads} -> {model.n_heads}, kv {rd.spec.model.n_kv_heads}"
            f" -> {model.n_kv_heads}) and {v.mlp:.0%} of MLP neurons (d_ff {rd.spec.model.d_ff} -> {model.d_ff}): "
            f"{n_before:,} -> {n_after:,} parameters")
    summary = {"kind": "structured", "heads": v.heads, "mlp": v.mlp, "parameters_before": n_before,
               "parameters_after": n_after, "layers": detail, "line": line}
    return cfg, spec, small, None, summary
