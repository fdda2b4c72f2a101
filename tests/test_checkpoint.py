"""Checkpoints in process: resharded restore, retention, fingerprints, exact and cross-mesh resume,
params-only restore into another optimizer, and both non-finite policies."""

import dataclasses
import json
import os
import shutil
import signal

import jax
import numpy as np
import pytest

from helpers import build, build_state, small_config, snapshot, synthetic_batch, with_mesh, with_train
from slimjax.checkpoint import Checkpointer, fingerprints
from slimjax.data import pipeline
from slimjax.errors import SlimjaxError
from slimjax.sharding import make_mesh, path_str
from slimjax.train.loop import train
from slimjax.train.run import build_run, fresh_state

SYNC = dict(async_save=False)


def byte_config(**train_kw):
    """The tiny test model on Shakespeare with the byte tokenizer (no tokenizer training), 2x2x2 mesh."""
    cfg = with_mesh(small_config(vocab_size=260), 2, 2, 2)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_kind="byte"),
                              checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=3))
    return with_train(cfg, **{"steps": 6, "log_every": 1, "eval_every": 3, "eval_batches": 1,
                              "progress": False, **train_kw})


def with_checkpoint(cfg, **kw):
    return dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, **kw))


def losses(workdir):
    return [(r["step"], r["train/loss"]) for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
            if "train/loss" in r]


def restore_state(workdir, cfg, step):
    mesh = make_mesh(cfg.mesh)
    _, setup, _ = fresh_state(cfg, mesh)
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), cfg.checkpoint, read_only=True)
    try:
        return ck.restore(step, setup.abstract.as_dict())
    finally:
        ck.close()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 6-step run on the 2x2x2 mesh with checkpoints at steps 3 and 6."""
    workdir = str(tmp_path_factory.mktemp("trained"))
    train(byte_config(), workdir)
    return workdir


def copy_without(src, dst, steps):
    shutil.copytree(src, dst)
    for s in steps:
        shutil.rmtree(os.path.join(dst, "checkpoints", str(s)))
    return dst


def test_resharded_restore_gives_equal_values(tmp_path):
    cfg = with_mesh(small_config(), 2, 2, 2)
    _, _, setup, state = build_state(cfg)
    # Non-trivial optimizer moments and RNG: every leaf differs from a fresh init.
    state = dataclasses.replace(state, opt_state=jax.tree.map(lambda x: x + 0.5 if x.ndim else x, state.opt_state))
    ck = Checkpointer(tmp_path, dataclasses.replace(cfg.checkpoint, **SYNC))
    ck.save(1, state.as_dict(), {"position": 1}, {"step": 1, "config": cfg.to_dict()})
    ck.close()
    want = jax.device_get(state.as_dict())
    for target, devices in (((8, 1, 1), None), ((1, 1, 1), jax.devices()[:1])):
        other = with_mesh(cfg, *target)
        mesh = make_mesh(other.mesh, devices)
        _, setup2, _ = fresh_state(other, mesh)
        ck = Checkpointer(tmp_path, other.checkpoint, read_only=True)
        got, data_state, meta = ck.restore(1, setup2.abstract.as_dict())
        params_only = ck.restore_params(1, setup2.abstract.params)
        ck.close()
        assert data_state == {"position": 1} and meta["step"] == 1
        for tree in (got, {"params": params_only}):
            flat_want = dict(jax.tree_util.tree_flatten_with_path(want)[0])
            for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
                np.testing.assert_array_equal(np.asarray(leaf), flat_want[path], err_msg=path_str(path))
        for leaf, sharding in zip(jax.tree.leaves(got["params"]), jax.tree.leaves(setup2.shardings.params)):
            assert leaf.sharding == sharding


def test_retention_keeps_latest_every_k_and_best(tmp_path):
    cfg = small_config().checkpoint
    cfg = dataclasses.replace(cfg, keep=2, keep_every=4, keep_best=1, **SYNC)
    ck = Checkpointer(tmp_path, cfg)
    evals = {2: 3.0, 5: 1.0, 7: 2.0}
    for step in range(1, 9):
        x = np.full((4,), step, np.float32)
        ck.save(step, {"params": {"w": x}, "opt_state": {"m": x}, "step": np.int32(step),
                       "rng": np.zeros(2, np.uint32), "skipped": np.int32(0)}, {}, {"step": step},
                eval_metrics={"loss": evals[step]} if step in evals else None)
    ck.close()
    # latest 2 (7, 8), every 4th (4, 8), lowest eval loss (5)
    assert Checkpointer(tmp_path, cfg, read_only=True).all_steps() == [4, 5, 7, 8]
    assert sorted(os.listdir(tmp_path)) == ["4", "5", "7", "8"]


def test_flipped_bytes_are_caught_by_fingerprints(trained, tmp_path):
    workdir = copy_without(trained, str(tmp_path / "w"), [])
    data = [os.path.join(d, f) for d, _, fs in os.walk(os.path.join(workdir, "checkpoints", "6", "params"))
            for f in fs if os.sep + "d" + os.sep in os.path.join(d, f)]
    assert data
    path = max(data, key=os.path.getsize)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(raw)
    with pytest.raises(SlimjaxError, match=r"checkpoints/6(/params)?"):
        restore_state(workdir, byte_config(), 6)


def test_exact_resume_on_the_same_mesh(trained, tmp_path):
    workdir = copy_without(trained, str(tmp_path / "w"), [6])
    handler = signal.getsignal(signal.SIGTERM)
    train(byte_config(), workdir)
    assert signal.getsignal(signal.SIGTERM) is handler  # the preemption handler lives only inside train()
    a = json.load(open(os.path.join(trained, "checkpoints", "6", "meta", "metadata")))["fingerprints"]
    b = json.load(open(os.path.join(workdir, "checkpoints", "6", "meta", "metadata")))["fingerprints"]
    assert a == b  # params, optimizer state, step, RNG: bit for bit
    assert losses(workdir)[-3:] == losses(trained)[-3:]


def test_resume_on_another_mesh_continues_with_the_same_losses(trained, tmp_path):
    workdir = copy_without(trained, str(tmp_path / "w"), [6])
    summary = train(with_mesh(byte_config(), 8, 1, 1), workdir)
    assert summary["start_step"] == 3 and summary["mesh"] == {"data": 8, "stage": 1, "fsdp": 1, "sequence": 1, "tensor": 1}
    original, resumed = dict(losses(trained)), losses(workdir)[6:]
    assert [s for s, _ in resumed] == [4, 5, 6]
    for step, loss in resumed:
        assert abs(loss - original[step]) <= 1e-6 * abs(original[step]), (step, loss, original[step])


def test_params_only_restore_into_another_optimizer(trained, tmp_path):
    base = byte_config()
    cfg = dataclasses.replace(base, optimizer=dataclasses.replace(base.optimizer, name="lion"))
    cfg = with_checkpoint(cfg, init_from=os.path.join(trained, "checkpoints", "6"))
    run = build_run(cfg, str(tmp_path / "finetune"))
    try:
        saved, _, _ = restore_state(trained, base, 6)
        assert fingerprints(run.state.params) == fingerprints(saved["params"])
        assert run.start_step == 0 and int(run.state.step) == 0
        # Lion's fresh state: one momentum per parameter, all zero.
        moments = [x for x in jax.tree.leaves(run.state.opt_state) if x.ndim]
        assert len(moments) == len(jax.tree.leaves(saved["params"])) and all(not np.any(m) for m in moments)
    finally:
        run.checkpointer.close()


def plant_inf(trained, workdir, cfg):
    """A copy of the run whose step-6 checkpoint has an inf in one parameter; returns its name."""
    copy_without(trained, workdir, [6])
    state, data_state, meta = restore_state(trained, cfg, 6)
    path, leaf = jax.tree_util.tree_flatten_with_path(state["params"])[0][0]
    bad = np.asarray(leaf).copy()
    bad.flat[0] = np.inf
    state["params"] = jax.tree_util.tree_map_with_path(
        lambda p, x: jax.device_put(bad, x.sharding) if p == path else x, state["params"])
    ck = Checkpointer(os.path.join(workdir, "checkpoints"), dataclasses.replace(cfg.checkpoint, **SYNC))
    ck.save(6, state, data_state, {"config": meta["config"], "step": 6})
    ck.close()
    return path_str(path), fingerprints(state["params"])


def test_nonfinite_stop_names_step_and_leaf_and_keeps_checkpoints(trained, tmp_path):
    workdir = str(tmp_path / "w")
    leaf, _ = plant_inf(trained, workdir, byte_config())
    before = snapshot(os.path.join(workdir, "checkpoints"))
    with pytest.raises(SlimjaxError, match=rf"step 7: non-finite .*{leaf}.*checkpoints/6\)"):
        train(byte_config(steps=9, nonfinite="stop"), workdir)
    assert snapshot(os.path.join(workdir, "checkpoints")) == before


def test_nonfinite_skip_counts_and_never_applies_the_update(trained, tmp_path):
    workdir = str(tmp_path / "w")
    _, planted = plant_inf(trained, workdir, byte_config())
    cfg = byte_config(steps=8, nonfinite="skip")
    summary = train(cfg, workdir)
    assert summary["skipped_steps"] == 2 and summary["final_step"] == 8
    state, _, _ = restore_state(workdir, cfg, 8)
    assert fingerprints(state["params"]) == planted and int(state["skipped"]) == 2
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    assert [r["train/nonfinite"] for r in records if r["step"] > 6 and "train/nonfinite" in r] == [1.0, 1.0]


def test_skip_policy_drops_only_the_bad_step():
    cfg = with_train(small_config(), nonfinite="skip")
    _, _, state, train_step, _, sharding = build(cfg)
    state, _ = train_step(state, pipeline.to_global(synthetic_batch(cfg, 0), sharding))
    before = jax.device_get(state.as_dict())
    bad = synthetic_batch(cfg, 1)
    bad["loss_mask"] = bad["loss_mask"].copy()
    bad["loss_mask"][0, 0] = np.inf  # a planted overflow: non-finite loss and gradients
    state, metrics = train_step(state, pipeline.to_global(bad, sharding))
    after = jax.device_get(state.as_dict())
    assert float(metrics["nonfinite"]) == 1.0 and not np.asarray(metrics["leaf_finite"]).all()
    assert fingerprints(after["params"]) == fingerprints(before["params"])
    assert fingerprints(after["opt_state"]) == fingerprints(before["opt_state"])
    assert int(after["skipped"]) == 1 and int(after["step"]) == 2
    assert not np.array_equal(after["rng"], before["rng"])  # the RNG advances every step
    state, metrics = train_step(state, pipeline.to_global(synthetic_batch(cfg, 2), sharding))
    assert float(metrics["nonfinite"]) == 0.0 and int(state.skipped) == 1
    assert np.isfinite(float(metrics["loss"]))
