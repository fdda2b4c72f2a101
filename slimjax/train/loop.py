"""The training loop: a readable function that steps and runs periodic work.

Periodic work is a list of hooks (``slimjax.train.hooks``): the built-in log, eval, checkpoint and
end-of-training sample, then the caller's, each a callable with a cadence. Metrics
stay on device between log points; fetching them is the only host sync, so the step time
reported is honest wall time per step over each logging interval.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import re
import statistics
import sys
import time
from typing import Any, Sequence

import jax
import ml_collections
import numpy as np

from slimjax.checkpoint import better
from slimjax.config import Config, validate
from slimjax.data import pipeline
from slimjax.errors import Preempted, SlimjaxError
from slimjax.infer.evaluate import classification_metrics, majority_baseline
from slimjax.infer.generate import Generator, complete
from slimjax.infer.scoring import eval_means
from slimjax.logs import quiet_logging
from slimjax.models.pipeline import describe as describe_pipeline
from slimjax.sharding import Rules, make_mesh, path_str
from slimjax.train import distributed, flops
from slimjax.train.hooks import Hook, HookContext, check_hooks
from slimjax.train.metrics import (CURVE_FILE, METRICS_FILE, SUMMARY_FILE, MetricsWriter, plot_loss_curve,
                                   read_metrics, write_json)
from slimjax.train.preemption import PreemptionWatch
from slimjax.train.run import Run, build_run, check_batch, finished_summary, pipeline_schedule
from slimjax.slim import classify
from slimjax.slim.spec import abstract_fn
from slimjax.train.step import LEAF_FINITE, model_view, tree_bytes


@dataclasses.dataclass
class Tracker:
    """Host-side bookkeeping between log points."""

    pending: list = dataclasses.field(default_factory=list)  # (step, device metrics)
    interval_start: float = 0.0
    data_wait: float = 0.0
    step_times: list = dataclasses.field(default_factory=list)
    throughput: list = dataclasses.field(default_factory=list)
    data_wait_fracs: list = dataclasses.field(default_factory=list)
    last_train_loss: float = float("nan")
    last_eval_loss: float = float("nan")
    last_eval: dict = dataclasses.field(default_factory=dict)  # the last evaluation's metrics
    last_eval_step: int = -1
    last_saved_step: int = -1
    best: float | None = None  # best checkpoint.best_metric so far, and evaluations since it improved
    since_best: int = 0
    stopped_early: bool = False


@dataclasses.dataclass
class Loop:
    """What the built-in hooks share: the run, its outputs and the bookkeeping between log points."""

    run: Run
    tr: Tracker
    writer: MetricsWriter
    bar: Any  # the tqdm progress bar (disabled off process 0)
    batches: Any  # the data iterator: its state goes into each checkpoint
    peak: float  # FLOP/s of all devices, for MFU
    tokens_per_step: int
    flops_per_step: float
    leaf_names: list[str]  # parameter paths, to name the non-finite ones
    sample: str | None = None  # the end-of-training sample, once taken


# Key of the summary ``train`` returns (never written to disk) when the workdir's run was already complete.
ALREADY_COMPLETE = "already_complete"

# The names of the built-in hooks (also the prefixes of what they write), in the order they run.
BUILTIN_HOOKS = ("train", "eval", "checkpoint", "sample")
EARLY_STOP = "early_stop"  # checkpoint meta key: best metric so far, evaluations since, whether the run stopped


def train(config: ml_collections.ConfigDict | Config, workdir: str, hooks: Sequence[Hook] = ()) -> dict[str, Any]:
    """Trains per ``config`` in ``workdir`` (resuming from its latest checkpoint); returns the summary.

    ``hooks`` run at each step this call trains that they are due, after the built-in ones (log,
    eval, checkpoint, sample), in the order given; an exception from one ends the run and propagates.

    Raises ``Preempted`` after saving a checkpoint when SIGTERM arrives (the handler is installed
    only while this runs), and ``SlimjaxError`` for a bad hook (before the workdir is touched) or a
    non-finite step under ``train.nonfinite="stop"`` (nothing of that step is checkpointed).
    """
    cfg = config if isinstance(config, Config) else validate(config)
    # Rules overrides are checked in sharding (config.py cannot import it); do it now, before joining
    # other processes or creating the workdir, so a typo'd logical name leaves nothing behind.
    Rules.from_config(cfg.mesh)
    user_hooks = check_hooks(hooks, BUILTIN_HOOKS)
    quiet_logging()  # again: absl.app.run sets its own verbosity after slimjax was imported
    distributed.initialize(cfg.distributed)  # before any device is touched; no-op for one process
    check_batch(cfg, make_mesh(cfg.mesh))  # a finished run too: the same flags must still make sense
    done = finished_summary(cfg, workdir)
    if done is not None:  # nothing to train: leave every file of the finished run as it is
        step, summary = done
        if jax.process_index() == 0:
            print(f"slimjax: {os.path.abspath(workdir)} is already complete at step {step} (train.steps="
                  f"{cfg.train.steps}); nothing changed. Raise train.steps to train further, or use a new --workdir",
                  file=sys.stderr)
        return {**summary, ALREADY_COMPLETE: True}
    run = build_run(cfg, workdir)
    try:
        with PreemptionWatch() as watch:
            return _loop(run, watch, user_hooks)
    finally:
        run.checkpointer.close()


def _loop(run: Run, watch: PreemptionWatch, user_hooks: Sequence[Hook]) -> dict[str, Any]:
    cfg, t = run.cfg, run.cfg.train
    is_main = jax.process_index() == 0
    writer = MetricsWriter(run.workdir, enabled=is_main)
    peak, peak_source = flops.system_peak(jax.devices())
    tokens_per_step = t.global_batch_size * cfg.data.seq_len
    bar = _progress(run, enabled=is_main and t.progress)
    leaf_names = [path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(run.setup.abstract.params)[0]]

    t_start = time.perf_counter()
    lp = Loop(run=run, tr=Tracker(), writer=writer, bar=bar,
              batches=pipeline.iterate(run.train_data, run.data_state, cfg.data.prefetch), peak=peak,
              tokens_per_step=tokens_per_step,
              flops_per_step=flops.flops_per_token(cfg.model, cfg.data.seq_len) * tokens_per_step,
              leaf_names=leaf_names)
    tr = lp.tr
    if run.start_step:  # early stopping continues from where the checkpoint left it
        saved = run.checkpointer.read_meta(run.start_step).get(EARLY_STOP, {})
        tr.best, tr.since_best = saved.get("best"), saved.get("since_best", 0)
    builtin = builtin_hooks(lp)
    hooks = [*builtin.values(), *user_hooks]
    tr.interval_start = time.perf_counter()
    try:
        for step in range(run.start_step + 1, t.steps + 1):
            t0 = time.perf_counter()
            batch = pipeline.to_global(next(lp.batches), run.batch_sharding)
            tr.data_wait += time.perf_counter() - t0
            run.state, metrics = run.train_step(run.state, batch)
            tr.pending.append((step, metrics))
            bar.update(1)
            last = step == t.steps
            for hook in hooks:
                if hook.due(step, last):
                    _call(lp, hook, step, last)
            if tr.stopped_early:  # the run ends here, with this step checkpointed
                if tr.last_saved_step != step:
                    _call(lp, builtin["checkpoint"], step, last=True)
                break
            # SIGTERM: checkpoint this step boundary and stop (at the last step, just finish).
            if step < t.steps and watch.requested(step, agree=step % t.log_every == 0):
                if tr.last_saved_step != step:
                    _call(lp, builtin["checkpoint"], step, last=False)
                run.checkpointer.wait()
                raise Preempted(step, run.checkpointer.directory)
    except BaseException:
        writer.close()  # metrics written so far stay readable; the exception says why the run ended
        raise
    finally:
        bar.close()
    if run.start_step >= t.steps:  # already complete: report the restored model's eval loss (and sample)
        for name in ("eval", "sample"):
            if name in builtin:
                _call(lp, builtin[name], run.start_step, last=True)
    run.checkpointer.wait()
    wall = time.perf_counter() - t_start
    summary = _summary(run, tr, peak, peak_source, wall)
    if lp.sample is not None:
        summary["sample"] = lp.sample
    if is_main:
        # Strict JSON: a value with nothing measured (no step trained: no tokens/s) is null, not NaN.
        write_json(os.path.join(run.workdir, SUMMARY_FILE),
                   {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in summary.items()})
        plot_loss_curve(read_metrics(os.path.join(run.workdir, METRICS_FILE)),
                        os.path.join(run.workdir, CURVE_FILE), title=f"slimjax: {run.workdir}")
    writer.close()
    if jax.process_count() > 1:  # when train() returns on any process, process 0's files are complete
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("slimjax: run outputs written")
    return summary


def _call(lp: Loop, hook: Hook, step: int, last: bool) -> None:
    """Runs ``hook`` at ``step``; unless it is ``in_step_time``, its wall time is taken out of the
    current timing interval, so it does not count as training step time."""
    t0 = time.perf_counter()
    hook.fn(HookContext(step, last, lp.run, hook.name, lp.writer))
    if not hook.in_step_time:
        lp.tr.interval_start += time.perf_counter() - t0


def builtin_hooks(lp: Loop) -> dict[str, Hook]:
    """The built-in hooks by name, in the order they run. Log comes first: it closes the timing
    interval (so eval and checkpoint time stay out of it) and stops a non-finite run before anything
    else; checkpoint comes after eval, so a checkpoint at an eval step is saved with its eval loss."""
    cfg = lp.run.cfg
    hooks = [Hook(cfg.train.log_every, functools.partial(_log, lp), "train", in_step_time=True),
             Hook(cfg.train.eval_every, functools.partial(_evaluate, lp), "eval"),
             Hook(cfg.checkpoint.every_steps, functools.partial(_checkpoint, lp), "checkpoint")]
    if cfg.train.sample_tokens and cfg.model.family == "decoder" and lp.run.task != "classify":
        # an encoder does not generate; a classifier's text head is not trained
        hooks.append(Hook(0, functools.partial(_sample, lp), "sample"))  # once, at the end
    return {hook.name: hook for hook in hooks}


def _stop_if_nonfinite(lp: Loop, flags: list[float]) -> None:
    """Under "stop", the first pending step whose loss or gradient was non-finite ends the run."""
    run = lp.run
    if run.cfg.train.nonfinite != "stop":
        return
    for (s, m), flag in zip(lp.tr.pending, flags):
        if flag > 0:
            ok = np.asarray(jax.device_get(m[LEAF_FINITE]))  # fetched only now that it matters
            bad = [n for n, good in zip(lp.leaf_names, ok) if not good]
            names = ", ".join(bad[:4]) + (f" and {len(bad) - 4} more" if len(bad) > 4 else "")
            run.checkpointer.wait()
            last = run.checkpointer.latest_step()
            raise SlimjaxError(
                f"step {s}: non-finite loss or gradient ({'parameters: ' + names if bad else 'loss only'}); "
                f"stopped without checkpointing it (last good checkpoint: "
                f"{'none' if last is None else f'{run.checkpointer.directory}/{last}'}); lower "
                "optimizer.learning_rate or set train.nonfinite=skip")


def _log(lp: Loop, ctx: HookContext) -> None:
    """Fetches the pending steps' metrics, writes them (timing at the log step), closes the interval."""
    tr = lp.tr
    fetched = jax.device_get([{k: v for k, v in m.items() if k != LEAF_FINITE} for _, m in tr.pending])
    _stop_if_nonfinite(lp, [float(m["nonfinite"]) for m in fetched])
    elapsed = time.perf_counter() - tr.interval_start
    n = len(fetched)
    timing = {"step_time_s": elapsed / n, "tokens_per_s": n * lp.tokens_per_step / elapsed,
              "mfu": n * lp.flops_per_step / elapsed / lp.peak, "data_wait_frac": tr.data_wait / elapsed}
    for (s, _), m in zip(tr.pending, fetched):
        ctx.write({k: float(v) for k, v in m.items()} | (timing if s == ctx.step else {}), step=s)
    tr.step_times.append(timing["step_time_s"])
    tr.throughput.append(timing["tokens_per_s"])
    tr.data_wait_fracs.append(timing["data_wait_frac"])
    # A classifier's loss is its cls term (the next-token loss it also logs is not trained).
    key = f"terms/{classify.TERM}" if lp.run.task == "classify" else "loss"
    tr.last_train_loss = float(np.mean([float(m[key]) for m in fetched]))
    lp.bar.set_postfix(loss=f"{tr.last_train_loss:.3f}", tok_s=f"{timing['tokens_per_s']:,.0f}",
                       mfu=f"{timing['mfu']:.1%}", refresh=False)
    tr.pending.clear()
    tr.data_wait = 0.0
    tr.interval_start = time.perf_counter()


def _evaluate(lp: Loop, ctx: HookContext) -> None:
    tr, run = lp.tr, lp.run
    if run.task == "classify":
        scores = evaluate_classes(run)
    elif run.cfg.model.family == "decoder":
        loss = evaluate_loss(run)
        scores = {"loss": loss, "perplexity": math.exp(min(loss, 50))}
    else:
        means = evaluate_means(run)
        scores = {"loss": means["mlm"], **means}
    tr.last_eval, tr.last_eval_loss, tr.last_eval_step = scores, scores["loss"], ctx.step
    ctx.write({k: v for k, v in scores.items() if isinstance(v, float)})
    metric, patience = run.cfg.checkpoint.best_metric, run.cfg.train.early_stop_patience
    if better(metric, scores[metric], tr.best):
        tr.best, tr.since_best = scores[metric], 0
    else:
        tr.since_best += 1
    tr.stopped_early = bool(patience) and tr.since_best >= patience and ctx.step < run.cfg.train.steps
    if ctx.is_main:
        shown = ", ".join(f"{k} {v:.4f}" for k, v in scores.items() if isinstance(v, float) and k != "perplexity")
        lp.bar.write(f"step {ctx.step}: eval {shown}" + (
            f"; no better {metric} in {tr.since_best} evaluations: stopping early" if tr.stopped_early else ""))


def _checkpoint(lp: Loop, ctx: HookContext) -> None:
    run, cfg, tr, batches, step = lp.run, lp.run.cfg, lp.tr, lp.batches, ctx.step
    # Never save a state that followed a non-finite step under "stop" (log may not have run yet).
    _stop_if_nonfinite(lp, [float(f) for f in jax.device_get([m["nonfinite"] for _, m in tr.pending])])
    meta = {"config": cfg.to_dict(), "spec": run.setup.spec.to_json(), "step": step,
            EARLY_STOP: {"best": tr.best, "since_best": tr.since_best, "stopped": tr.stopped_early}}
    run.checkpointer.save(step, run.state.as_dict(), batches.get_state(), meta,
                          eval_metrics=_floats(tr.last_eval) if tr.last_eval_step == step else None)
    tr.last_saved_step = step


def _floats(scores: dict) -> dict[str, float]:
    return {k: v for k, v in scores.items() if isinstance(v, float)}


def _sample(lp: Loop, ctx: HookContext) -> None:
    lp.sample = sample_text(lp.run)
    if ctx.is_main:
        print(f"sample: {display_text(lp.sample)}")


def display_text(text: str) -> str:
    """Generated text for a terminal: blank lines collapsed and trailing whitespace dropped (a
    barely trained model emits newline after newline); the summary keeps the text as generated."""
    return re.sub(r"\n[ \t]*(?:\n[ \t]*)+", "\n", text).rstrip()


def evaluate_loss(run: Run) -> float:
    """Mean NLL per target token over the held-out batches."""
    nll = tokens = 0.0
    for batch in run.eval_data:
        out = jax.device_get(run.eval_step(run.state, pipeline.to_global(batch, run.batch_sharding)))
        nll += float(out["nll_sum"])
        tokens += float(out["tokens"])
    return nll / max(tokens, 1.0)


def evaluate_classes(run: Run) -> dict[str, Any]:
    """Loss (mean cross-entropy per example), accuracy and macro-F1 on the held-out examples,
    with the majority-class baseline's accuracy and macro-F1 beside them."""
    nll = n = 0.0
    predicted, labels = [], []
    for batch in run.eval_data:
        out = jax.device_get(run.eval_step(run.state, pipeline.to_global(batch, run.batch_sharding)))
        nll, n = nll + float(out["nll_sum"]), n + float(out["tokens"])
        keep = np.asarray(out["labels"]) >= 0
        predicted.append(np.asarray(out["predicted"])[keep])
        labels.append(np.asarray(out["labels"])[keep])
    true = np.concatenate(labels)
    classes = run.cfg.slim.classify.classes
    base = majority_baseline(run.data_stats["train_classes"], true, classes)
    return {"loss": nll / max(n, 1.0), **classification_metrics(np.concatenate(predicted), true),
            "majority_accuracy": base["accuracy"], "majority_macro_f1": base["macro_f1"],
            "majority_class": base["class"], "examples": float(len(true))}


def evaluate_means(run: Run) -> dict[str, float]:
    """An encoder's held-out terms and accuracies (``mlm``, ``nsp``, ``mlm_accuracy``, ...), each
    over its own count."""
    return eval_means([jax.device_get(run.eval_step(run.state, pipeline.to_global(batch, run.batch_sharding)))
                       for batch in run.eval_data])


def sample_text(run: Run) -> str:
    """A greedy continuation of ``train.sample_prompt`` by the trained model (every process takes
    part, since the parameters are sharded over all of them)."""
    t = run.cfg.train
    params = model_view(run.setup.built, run.state)
    generator = Generator(run.cfg.model, params, run.mesh, run.rules, run.dtype, abstract=abstract_fn(run.setup.spec))
    return t.sample_prompt + complete(generator, run.tok, [t.sample_prompt], t.sample_tokens)[0]


def _summary(run: Run, tr: Tracker, peak: float, peak_source: str, wall: float) -> dict[str, Any]:
    # The first interval includes warm-up (allocation, caches); report the median of the rest.
    steady = tr.throughput[1:] or tr.throughput
    tokens_per_s = statistics.median(steady) if steady else float("nan")
    fpt = flops.flops_per_token(run.cfg.model, run.cfg.data.seq_len)
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(run.setup.abstract.params))
    return {
        "config": run.cfg.to_dict(),
        "mesh": dict(run.mesh.shape),
        "pipeline": describe_pipeline(pipeline_schedule(run.cfg, run.mesh)),
        "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
        "processes": jax.process_count(),
        "compute_dtype": str(np.dtype(run.dtype)),
        "n_params": n_params,
        "state_bytes": tree_bytes(run.setup.abstract),
        "start_step": run.start_step,
        "final_step": int(jax.device_get(run.state.step)),
        "resumed": run.start_step > 0,
        "compile_time_s": run.compile_seconds,
        "wall_time_s": wall,
        "tokens_per_s": tokens_per_s,
        "step_time_s": statistics.median(tr.step_times[1:] or tr.step_times) if tr.step_times else float("nan"),
        "flops_per_token": fpt,
        "mfu": fpt * tokens_per_s / peak if peak else float("nan"),
        "peak_flops": peak,
        "peak_source": peak_source,
        "data_wait_frac": statistics.median(tr.data_wait_fracs) if tr.data_wait_fracs else float("nan"),
        "skipped_steps": int(jax.device_get(run.state.skipped)),
        "final_train_loss": tr.last_train_loss,
        "final_eval_loss": tr.last_eval_loss,
        "final_eval": _floats(tr.last_eval) | {k: v for k, v in tr.last_eval.items() if isinstance(v, str)},
        "stopped_early": tr.stopped_early,
        "tokenizer": run.tok.path,
        "data": run.data_stats,
    }


def _progress(run: Run, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(total=run.cfg.train.steps, initial=run.start_step, disable=not enabled,
                desc="train", unit="step", dynamic_ncols=True)
