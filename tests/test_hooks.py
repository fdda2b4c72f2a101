"""Hooks: user periodic work in ``slimjax.train`` (cadence, what a hook sees and writes, bad input,
errors), alongside the built-in hooks whose behaviour must not change."""

import dataclasses
import json
import math
import os

import jax
import numpy as np
import pytest

import slimjax
from helpers import small_config, with_mesh, with_train
from slimjax import Hook, HookContext
from slimjax.errors import SlimjaxError


def byte_config(**train_kw):
    """The tiny test model on Shakespeare with the byte tokenizer (no tokenizer training), 2x2x2 mesh."""
    cfg = with_mesh(small_config(vocab_size=260), 2, 2, 2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_kind="byte"),
                              checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=2))
    return with_train(cfg, **{"steps": 5, "log_every": 1, "eval_every": 1000, "eval_batches": 1,
                              "sample_tokens": 0, "progress": False, **train_kw})


def records(workdir):
    return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


def test_user_hooks_run_at_their_steps_after_the_builtins(tmp_path, capsys):
    workdir = str(tmp_path / "w")
    seen, at_end = [], []

    def param_norm(ctx: HookContext) -> None:
        params = jax.device_get(ctx.run.state.params)
        norm = math.sqrt(sum(float(np.sum(np.square(x))) for x in jax.tree.leaves(params)))
        # Built-ins run first: this step's train metrics are already written.
        logged = any(r["step"] == ctx.step and "train/loss" in r for r in records(ctx.run.workdir))
        seen.append((ctx.step, ctx.last, norm, logged))
        ctx.write({"norm": norm})

    hooks = [Hook(every=2, fn=param_norm, name="params"),
             Hook(every=0, fn=lambda ctx: at_end.append(ctx.step), name="end")]
    summary = slimjax.train(byte_config(sample_tokens=4), workdir, hooks=hooks)

    assert [(s, last, logged) for s, last, _, logged in seen] == [(2, False, True), (4, False, True), (5, True, True)]
    norms = [n for _, _, n, _ in seen]
    assert all(math.isfinite(n) for n in norms) and len(set(norms)) == 3  # the state of each step, not a copy
    assert [(r["step"], r["params/norm"]) for r in records(workdir) if "params/norm" in r] == \
        [(s, n) for s, _, n, _ in seen]
    assert at_end == [5]
    # The built-ins as before: checkpoints every 2 steps and at the end, the sample once, at the end.
    assert sorted(int(n) for n in os.listdir(os.path.join(workdir, "checkpoints")) if n.isdigit()) == [2, 4, 5]
    assert [r["step"] for r in records(workdir) if "train/loss" in r] == [1, 2, 3, 4, 5]
    assert summary["final_step"] == 5 and summary["sample"].startswith("ROMEO:")
    assert capsys.readouterr().out.count(f"sample: {summary['sample']}\n") == 1

    # Already complete: nothing runs (no hook, no eval), the saved summary comes back.
    again = slimjax.train(byte_config(sample_tokens=4), workdir, hooks=hooks)
    assert len(seen) == 3 and at_end == [5]
    assert again["already_complete"] and again["final_step"] == 5 and again["sample"] == summary["sample"]
    assert again["final_eval_loss"] == summary["final_eval_loss"]


def test_an_exception_in_a_hook_ends_the_run_and_keeps_its_metrics(tmp_path):
    workdir = str(tmp_path / "w")

    def fail(ctx: HookContext) -> None:
        raise RuntimeError(f"hook failed at step {ctx.step}")

    with pytest.raises(RuntimeError, match="hook failed at step 2"):
        slimjax.train(byte_config(), workdir, hooks=[Hook(every=2, fn=fail, name="fail")])
    assert [r["step"] for r in records(workdir) if "train/loss" in r] == [1, 2]


@pytest.mark.parametrize("make, message", [
    (lambda: Hook(every=-1, fn=print, name="norm"), r"hook 'norm': every=-1 must be an integer >= 0"),
    (lambda: Hook(every=2, fn="print", name="norm"), r"hook 'norm': fn='print' is not callable"),
    (lambda: Hook(every=0, fn=print, name="norm", at_end=False), r"hook 'norm': every=0 with at_end=False"),
    (lambda: Hook(every=1, fn=print, name=""), r"hook name '' must be a non-empty string"),
])
def test_a_bad_hook_is_a_slimjax_error_naming_it(make, message):
    with pytest.raises(SlimjaxError, match=message):
        make()


@pytest.mark.parametrize("hooks, message", [
    ([print], r"hooks\[0\] is a builtin_function_or_method, not a slimjax.Hook"),
    ([Hook(every=1, fn=print, name="eval")], r"hook name 'eval' is taken"),
    ([Hook(every=1, fn=print, name="a"), Hook(every=2, fn=print, name="a")], r"hook name 'a' is taken"),
])
def test_bad_hooks_fail_before_the_workdir_is_touched(tmp_path, hooks, message):
    workdir = tmp_path / "w"
    with pytest.raises(SlimjaxError, match=message):
        slimjax.train(byte_config(), str(workdir), hooks=hooks)
    assert not workdir.exists()
