"""Pipeline parallelism over the stage axis: loss and gradients equal the unpipelined model's for
GPipe and circular schedules on mixed meshes (with and without a bubble), stacked weights sharded
over stage leaf by leaf, train steps and checkpoints across pipelined and plain meshes, kill -9
resume, the bubble and traffic figures, and bad pipeline keys through the CLI."""

import dataclasses
import functools
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from helpers import build_state, run_steps, small_config, synthetic_batch, with_train
from test_fault import FLAGS, fingerprints, kill9_then_resume
from slimjax.models.pipeline import Schedule, bubble_fraction, make_schedule, pipelined, traffic
from slimjax.sharding import Rules, activation_rules, build_mesh, path_str
from slimjax.train.loop import train
from slimjax.slim.spec import ModelSpec, build
from slimjax.train.state import build_model, params_of

DRIVER = os.path.join(os.path.dirname(__file__), "train_driver.py")
TOL = dict(rtol=1e-5, atol=1e-6)


def tiny(n_layers=8, **kw):
    """d_model 32, seq 16: small enough that each pipelined compile takes seconds."""
    cfg = small_config(n_layers=n_layers, d_model=32, n_heads=4, n_kv_heads=2, d_ff=64, **kw)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=16))


def with_pipeline(cfg, stage, data, fsdp, tensor, schedule="gpipe", microbatches=0, repeats=1):
    return dataclasses.replace(cfg, mesh=dataclasses.replace(
        cfg.mesh, stage=stage, data=data, fsdp=fsdp, tensor=tensor, pipeline_schedule=schedule,
        pipeline_microbatches=microbatches, pipeline_repeats=repeats))


CFG = tiny()
# The model's own initialisation: random_model's N(0, 0.3^2) weights make f32 reassociation alone
# (any resharding) move gradients by ~1e-3 relative, beyond the parity tolerance.
_MODEL = build_model(CFG.model, jax.random.key(0), jnp.float32)
GRAPHDEF, PARAMS = nnx.graphdef(_MODEL), params_of(_MODEL)
BATCH = synthetic_batch(CFG)


def loss_fn(params):
    logits = nnx.merge(GRAPHDEF, params)(BATCH["inputs"], BATCH["positions"], BATCH["segment_ids"])
    logp = jax.nn.log_softmax(logits.astype(jnp.float32))
    return -jnp.mean(jnp.take_along_axis(logp, BATCH["targets"][..., None], -1))


@functools.cache
def reference():
    return jax.jit(jax.value_and_grad(loss_fn))(PARAMS)


@functools.cache
def pipelined_loss_and_grads(stage, data, fsdp, tensor, microbatches, repeats):
    """(loss, grads) with the parameters sharded as a pipelined train state holds them."""
    mesh = build_mesh(data=data, fsdp=fsdp, tensor=tensor, stage=stage)
    rules = Rules.from_config(CFG.mesh)
    built = build(ModelSpec("decoder", CFG.model), jnp.float32)
    params = jax.device_put(PARAMS, rules.tree_shardings(built.axes, built.shapes, mesh))
    with activation_rules(mesh, rules), pipelined(Schedule(stage, microbatches, repeats)):
        return jax.jit(jax.value_and_grad(loss_fn))(params)


# (stage, data, fsdp, tensor, pipeline microbatches, repeats): GPipe (repeats 1) and circular, with
# microbatches below, at and above the stage count, and every other axis in some case.
CASES = [
    (2, 2, 2, 1, 2, 1),
    (4, 2, 1, 1, 2, 1),  # M < S: a bubble larger than the work
    (2, 1, 2, 2, 4, 1),  # tensor parallel inside the stages, M > S
    (2, 2, 2, 1, 4, 2),  # circular, M > S
    (4, 1, 2, 1, 4, 2),  # circular, M = S
    (4, 2, 1, 1, 2, 2),  # circular, M < S
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "s{}d{}f{}t{}-m{}r{}".format(*c))
def test_loss_and_gradients_equal_the_unpipelined_model(case):
    loss, grads = pipelined_loss_and_grads(*case)
    ref_loss, ref_grads = reference()
    np.testing.assert_allclose(loss, ref_loss, **TOL)
    for (path, got), want in zip(jax.tree_util.tree_flatten_with_path(grads)[0], jax.tree.leaves(ref_grads)):
        np.testing.assert_allclose(got, want, err_msg=path_str(path), **TOL)


def test_gpipe_and_circular_agree_on_the_same_mesh():
    gpipe, circular = pipelined_loss_and_grads(2, 2, 2, 1, 4, 1), pipelined_loss_and_grads(2, 2, 2, 1, 4, 2)
    np.testing.assert_allclose(gpipe[0], circular[0], **TOL)
    for a, b in zip(jax.tree.leaves(gpipe[1]), jax.tree.leaves(circular[1])):
        np.testing.assert_allclose(a, b, **TOL)


def test_stacked_parameters_and_moments_are_split_over_stage_leaf_by_leaf():
    cfg = with_pipeline(tiny(n_layers=4), 2, 2, 1, 2)
    _, _, setup, state = build_state(cfg)
    stacked = {"params": 0, "moments": 0}
    for kind, tree in (("params", state.params), ("moments", state.opt_state)):
        for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            name, spec = path_str(path), tuple(leaf.sharding.spec)
            if "blocks/" in name:
                stacked[kind] += 1
                assert spec[0] == "stage", (name, spec)
                assert {s.data.shape[0] for s in leaf.addressable_shards} == {2}, name  # 4 layers / 2 stages
            else:
                assert "stage" not in jax.tree.leaves(spec), (name, spec)
    assert stacked["params"] == 9 and stacked["moments"] == 2 * stacked["params"]  # 9 Llama block weights; AdamW: mu and nu


def test_bubble_fraction_and_traffic():
    assert bubble_fraction(4, 4) == pytest.approx(3 / 7)  # GPipe: (S-1)/(M+S-1)
    assert bubble_fraction(4, 8, 2) == pytest.approx(3 / 19)  # circular: (S-1)/(R*M+S-1)
    assert bubble_fraction(4, 8, 2) < bubble_fraction(4, 8, 1)
    # M < S: a microbatch re-enters stage 0 only every S iterations, so repeats add idle slots.
    assert Schedule(4, 2, 2).iterations == 4 + 2 + 3 and bubble_fraction(4, 2, 2) == pytest.approx(1 - 4 / 9)
    t = traffic(make_schedule("circular", 4, 8, 2), 16, 16, 32, 4, passes=2)  # 2 passes of 16 rows
    assert t.iterations == 2 * 8 + 3 and t.passes == 2 and t.bubble == pytest.approx(3 / 19)
    assert t.permute_bytes == 4 * 2 * 16 * 32 * 4  # 4 stages each send a [2, 16, 32] f32 block
    assert t.step_bytes == 2 * t.forward_bytes == 2 * 2 * (t.iterations + 1) * t.permute_bytes
    assert make_schedule("gpipe", 4, 0, 2) == Schedule(4, 4, 1, "gpipe")  # one microbatch per stage; no repeats
    assert traffic(make_schedule("gpipe", 1, 0, 1), 16, 16, 32, 4) is None


def test_train_steps_with_gradient_accumulation_match_the_unpipelined_run():
    cfg = with_train(tiny(n_layers=4), microbatches=2)
    plain = run_steps(with_pipeline(cfg, 1, 2, 2, 2), 3)
    for piped in (with_pipeline(cfg, 2, 2, 2, 1, "gpipe", 2), with_pipeline(cfg, 2, 2, 1, 2, "circular", 4, 2)):
        np.testing.assert_allclose(run_steps(piped, 3), plain, rtol=1e-5)


def losses(workdir):
    return [(r["step"], r["train/loss"]) for r in map(json.loads, open(os.path.join(workdir, "metrics.jsonl")))
            if "train/loss" in r]


def run_config(mesh):
    """The tiny model on Shakespeare bytes for 4 steps, checkpoints at 2 and 4."""
    cfg = tiny(n_layers=4, vocab_size=260)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer_kind="byte"),
                              checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=2, async_save=False))
    cfg = with_train(cfg, steps=4, log_every=1, eval_every=1000, eval_batches=1, progress=False, sample_tokens=0)
    return with_pipeline(cfg, *mesh)


PLAIN, GPIPE, CIRCULAR = (1, 4, 2, 1), (2, 2, 2, 1, "gpipe", 4), (2, 2, 1, 2, "circular", 4, 2)


def test_checkpoints_move_between_pipelined_and_plain_meshes(tmp_path):
    """A pipelined run trains like a plain one; each resumes from the other's checkpoint."""
    runs = {}
    for name, mesh in (("plain", PLAIN), ("gpipe", GPIPE)):
        runs[name] = str(tmp_path / name)
        summary = train(run_config(mesh), runs[name])
        if name == "gpipe":  # 2 stages, 4 microbatches: 5 iterations, 1 of 5 idle per stage
            assert summary["pipeline"] == {"schedule": "gpipe", "stages": 2, "microbatches": 4, "repeats": 1,
                                           "iterations": 5, "bubble_fraction": pytest.approx(0.2)}
        np.testing.assert_allclose([v for _, v in losses(runs[name])], [v for _, v in losses(runs["plain"])],
                                   rtol=1e-5)
    for source, target in (("plain", CIRCULAR), ("gpipe", PLAIN)):
        workdir = str(tmp_path / f"{source}-then")
        shutil.copytree(runs[source], workdir)
        shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
        summary = train(run_config(target), workdir)
        assert summary["start_step"] == 2 and summary["mesh"]["stage"] == target[0]
        resumed = losses(workdir)[4:]
        assert [s for s, _ in resumed] == [3, 4]
        np.testing.assert_allclose([v for _, v in resumed], [v for _, v in losses(runs["plain"])[2:]], rtol=1e-5)


def test_pipelined_run_resumes_bit_exactly_after_kill9(tmp_path):
    flags = [f for f in FLAGS if not f.startswith("--config.mesh.")] + [
        "--config.model.n_layers=4", "--config.mesh.stage=2", "--config.mesh.data=2", "--config.mesh.fsdp=2",
        "--config.mesh.pipeline_schedule=circular", "--config.mesh.pipeline_repeats=2",
        "--config.train.sample_tokens=0"]

    def argv_for(workdir):
        return [sys.executable, DRIVER, "train", *flags, "--config.train.steps=8",
                "--config.checkpoint.every_steps=2", f"--workdir={workdir}"]

    straight, killed = kill9_then_resume(argv_for, tmp_path, 8, 2)
    assert fingerprints(killed, 8) == fingerprints(straight, 8)


BAD = [
    (["--config.mesh.stage=2", "--config.model.n_layers=3"],
     "model.n_layers=3 is not divisible by mesh.stage=2"),
    (["--config.mesh.stage=2", "--config.mesh.pipeline_schedule=circular", "--config.mesh.pipeline_repeats=2",
      "--config.model.n_layers=6"], "model.n_layers=6 is not divisible by mesh.stage=2 x mesh.pipeline_repeats=2"),
    (["--config.mesh.stage=2", "--config.mesh.pipeline_microbatches=3"],
     "mesh.pipeline_microbatches=3 does not divide the 16 rows"),
    (["--config.mesh.stage=2", "--config.model.scan_layers=False"], "set model.scan_layers=True"),
    (["--config.mesh.pipeline_repeats=2"], "needs mesh.pipeline_schedule='circular'"),
    (["--config.mesh.stage=-1", "--config.mesh.data=1", "--config.model.n_layers=4"],
     "model.n_layers=4 is not divisible by mesh.stage=8"),
    (["--config.mesh.stage=2", "--config.mesh.data=4", "--config.mesh.pipeline_microbatches=8"],
     "a pipeline microbatch of 2 rows"),
]


@pytest.mark.parametrize("flags,expected", BAD, ids=lambda x: x if isinstance(x, str) else "")
def test_bad_pipeline_keys_are_one_line_exit_2(flags, expected, tmp_path):
    workdir = tmp_path / "new"
    base = ["--config.train.global_batch_size=16", "--config.data.tokenizer_kind=byte",
            "--config.model.vocab_size=260"]
    result = subprocess.run([sys.executable, "-m", "slimjax.cli", "train", *base, *flags, f"--workdir={workdir}"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimjax: error: ") and expected in lines[0], lines
    assert not workdir.exists()



def test_the_encoder_pipelines_too():
    """The encoder runs its stacked blocks through the same runner: equal losses over two steps."""
    cfg = small_config("bert", n_layers=4, d_model=32, n_heads=4, n_kv_heads=4, d_ff=64)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=16))
    plain = run_steps(with_pipeline(cfg, 1, 4, 2, 1), 2)
    np.testing.assert_allclose(run_steps(with_pipeline(cfg, 2, 2, 2, 1, "circular", 4, 2), 2), plain, rtol=1e-5)
