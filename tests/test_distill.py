"""Knowledge distillation: the loss terms against float64 NumPy references (KL at T=1 is cross
entropy against the teacher, the T^2 factor's gradient, the MSE mixture, top-k), a distilled
student that beats the same student trained without its teacher, the teacher untouched by
training, equal losses on one device and on a (2,2,2) mesh, a bit-exact resume after kill -9,
students made from evenly spaced teacher layers, and bad input."""

import dataclasses
import json
import os
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import slimjax
from helpers import flat, run_steps, snapshot, with_mesh, with_train
from test_fault import DRIVER, FLAGS, fingerprints, kill9_then_resume, one_line_error
from test_hooks import byte_config, records
from test_prune_cli import cli_here
from slimjax.slim import distill

V = 37


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def logits_pair(seed=0, shape=(3, 5, V)):
    rng = np.random.default_rng(seed)
    return rng.normal(0, 2, shape), rng.normal(0, 2, shape)


def test_kd_at_t1_is_cross_entropy_against_the_teacher_less_its_entropy():
    zs, zt = logits_pair()
    p, q = softmax(zt), softmax(zs)
    ce = -(p * np.log(q)).sum(-1)
    entropy = -(p * np.log(p)).sum(-1)
    got = distill.kd_per_token(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), 1.0)
    np.testing.assert_allclose(got, ce - entropy, rtol=1e-5, atol=1e-6)
    # Same gradient as cross entropy against the teacher's distribution: softmax(z_s) - p_t.
    grad = jax.grad(lambda z: distill.kd_per_token(z, jnp.asarray(zt, jnp.float32), 1.0).sum())(
        jnp.asarray(zs, jnp.float32))
    np.testing.assert_allclose(grad, q - p, atol=1e-6)


@pytest.mark.parametrize("t", [2.0, 5.0])
def test_kd_gradient_is_t_times_the_softened_difference(t):
    """d/dz_s [T^2 KL(p_t^T || p_s^T)] = T (softmax(z_s/T) - softmax(z_t/T)): with the T^2 factor the
    gradient no longer shrinks as 1/T^2 (Hinton et al. 2015, section 2.1)."""
    zs, zt = logits_pair(1)
    grad = jax.grad(lambda z: distill.kd_per_token(z, jnp.asarray(zt, jnp.float32), t).sum())(
        jnp.asarray(zs, jnp.float32))
    np.testing.assert_allclose(grad, t * (softmax(zs / t) - softmax(zt / t)), atol=1e-6)


def test_kd_gradient_approaches_logit_matching_at_high_temperature():
    zs, zt = logits_pair(2)
    zs, zt = zs - zs.mean(-1, keepdims=True), zt - zt.mean(-1, keepdims=True)  # zero-meaned, as in the paper
    grad = jax.grad(lambda z: distill.kd_per_token(z, jnp.asarray(zt, jnp.float32), 200.0).sum())(
        jnp.asarray(zs, jnp.float32))
    np.testing.assert_allclose(grad, (zs - zt) / V, rtol=0.05, atol=2e-4)


def test_mse_mixture_matches_numpy():
    zs, zt = logits_pair(3)
    t, beta, gamma = 2.0, 0.7, 0.05
    want = beta * ((softmax(zs / t) - softmax(zt / t)) ** 2).mean(-1) + gamma * ((zs - zt) ** 2).mean(-1)
    zs32, zt32 = jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32)
    got = beta * distill.mse_probs_per_token(zs32, zt32, t) + gamma * distill.mse_per_token(zs32, zt32)
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_top_k_kl_is_over_the_teachers_k_best_tokens_renormalised():
    zs, zt = logits_pair(4)
    t, k = 2.0, 5
    ids = np.argsort(-zt, axis=-1)[..., :k]
    p = softmax(np.take_along_axis(zt, ids, -1) / t)
    log_q = np.take_along_axis(np.log(softmax(zs / t)), ids, -1)
    want = t * t * (p * (np.log(p) - log_q)).sum(-1)
    got = distill.kd_per_token(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), t, top_k=k)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    full = distill.kd_per_token(jnp.asarray(zs, jnp.float32), jnp.asarray(zt, jnp.float32), t, top_k=V)
    np.testing.assert_allclose(full, distill.kd_per_token(jnp.asarray(zs, jnp.float32),
                                                          jnp.asarray(zt, jnp.float32), t), rtol=1e-5, atol=1e-6)


def test_evenly_spaced_layers_keep_the_first_and_last():
    assert distill.evenly_spaced(6, 3) == [0, 3, 5]  # 2.5 rounds half up
    assert distill.evenly_spaced(12, 6) == [0, 2, 4, 7, 9, 11]
    assert distill.evenly_spaced(4, 4) == [0, 1, 2, 3]


# ---- training with a teacher ----------------------------------------------------------------------

TEACHER_STEPS = 200
STUDENT_STEPS = 20


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    """A 2-layer teacher trained on the plays (byte tokenizer, 2x2x2 mesh) well past what a student
    reaches in STUDENT_STEPS steps, so its soft targets carry information the labels do not."""
    workdir = str(tmp_path_factory.mktemp("teacher"))
    cfg = byte_config(steps=TEACHER_STEPS, eval_batches=4)
    cfg = dataclasses.replace(cfg, checkpoint=dataclasses.replace(cfg.checkpoint, every_steps=TEACHER_STEPS))
    slimjax.train(cfg, workdir)
    return workdir


def with_distill(cfg, teacher_dir, **opts):
    return dataclasses.replace(cfg, slim=dataclasses.replace(
        cfg.slim, recipe=("distill",), distill=dataclasses.replace(cfg.slim.distill, teacher=teacher_dir, **opts)))


def student_config(**model):
    cfg = byte_config(steps=STUDENT_STEPS, eval_batches=4)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, **{"n_layers": 1, **model}))


def eval_loss(workdir):
    return [r for r in records(workdir) if "eval/loss" in r][-1]["eval/loss"]


def test_distilled_student_beats_the_undistilled_one_and_the_teacher_is_untouched(teacher, tmp_path, capsys):
    """A 1-layer student from the teacher's last layer (slimjax distill --layers=1), trained with and
    without its teacher for the same steps from the same start."""
    taught, plain = str(tmp_path / "taught"), str(tmp_path / "plain")
    result = cli_here(capsys, "distill", f"--teacher={teacher}", f"--out={taught}", "--layers=1",
                      f"--steps={STUDENT_STEPS}", "--temperature=2", "--alpha=0.5")
    assert result.returncode == 0, result.stderr[-3000:]
    init = os.path.join(taught, "student_init")
    result = cli_here(capsys, "train", f"--config={init}/config.py", f"--workdir={plain}",
                      f"--config.train.steps={STUDENT_STEPS}")
    assert result.returncode == 0, result.stderr[-3000:]
    assert eval_loss(taught) < eval_loss(plain) - 0.01, (eval_loss(taught), eval_loss(plain))
    logged = [r for r in records(taught) if "train/terms/kd" in r]
    assert logged and all(np.isfinite(r["train/terms/kd"]) for r in logged)

    from slimjax.cli.rundir import open_run

    student, source = open_run(taught), open_run(teacher)
    abstract = jax.eval_shape(lambda: student.built.init_state(student.built.shapes))
    shardings = student.rules.tree_shardings(student.built.state_axes(), abstract, student.mesh)
    slim = student.checkpointer.restore_slim(student.step, jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, shardings))
    kept = flat(jax.device_get(slim["distill"][distill.TEACHER]))
    want = flat(jax.device_get(source.restore_params()))
    assert kept.keys() == want.keys()
    for path in want:
        np.testing.assert_array_equal(kept[path], want[path], err_msg=path)  # bit-identical after training
    # The student started from the teacher's last layer (evenly_spaced(2, 1) == [1]), everything else copied.
    first = flat(jax.device_get(open_run(init).restore_params()))
    for path, x in first.items():
        np.testing.assert_array_equal(x, want[path][[1]] if path.startswith("blocks/") else want[path], err_msg=path)


def test_same_losses_on_one_device_and_a_2x2x2_mesh(teacher):
    cfg = with_distill(with_train(student_config(d_model=32, head_dim=4), steps=4), teacher, alpha=0.5,
                       mse_probs=1.0, mse_logits=0.1, hidden=0.5, top_k=16)
    one = run_steps(with_mesh(cfg, 1, 1, 1), 3, devices=jax.devices()[:1])
    mesh = run_steps(with_mesh(cfg, 2, 2, 2), 3)
    np.testing.assert_allclose(mesh, one, rtol=2e-5)


def test_slimjax_distill_rerun_after_kill9_resumes_bit_identically_without_the_teacher(teacher, tmp_path):
    """Killed with -9 mid-training, the same command resumes from the student's checkpoint, whose
    slim state holds the teacher: the teacher's directory is deleted before the re-run."""
    copy = str(tmp_path / "teacher_copy")
    shutil.copytree(teacher, copy)
    calls = []

    def argv_for(workdir):
        calls.append(workdir)
        if calls.count(workdir) == 2:
            shutil.rmtree(copy)
        source = teacher if workdir.endswith("straight") else copy
        return [sys.executable, DRIVER, "distill", f"--teacher={source}", f"--out={workdir}", "--layers=1",
                "--steps=8", "--hidden=0.5", "--mse_logits=0.1", "--config.checkpoint.every_steps=2",
                "--config.train.sample_tokens=0"]

    straight, killed = kill9_then_resume(argv_for, tmp_path, 8, 3)
    assert not os.path.exists(copy)
    got, want = fingerprints(killed, 8), fingerprints(straight, 8)
    assert {"params", "slim", "opt_state"} <= set(want) and got == want


BAD = [
    (["--config.slim.distill.temperature=0"], "slim.distill.temperature"),
    (["--config.slim.distill.alpha=1.5"], "slim.distill.alpha"),
    (["--config.model.vocab_size=300"], "vocab_size"),
]


@pytest.mark.parametrize("flags,named", BAD, ids=[b[1] for b in BAD])
def test_bad_distillation_input_is_one_line_exit_2(teacher, tmp_path, capsys, flags, named):
    before = snapshot(teacher)
    workdir = str(tmp_path / "student")
    line = one_line_error(cli_here(capsys, "train", *FLAGS, "--config.slim.recipe=('distill',)",
                                   f"--config.slim.distill.teacher={teacher}", f"--workdir={workdir}", *flags))
    assert named in line, line
    assert snapshot(teacher) == before


def test_a_missing_teacher_is_named(tmp_path, capsys):
    line = one_line_error(cli_here(capsys, "train", *FLAGS, "--config.slim.recipe=('distill',)",
                                   f"--config.slim.distill.teacher={tmp_path / 'nowhere'}",
                                   f"--workdir={tmp_path / 'student'}"))
    assert "slim.distill.teacher" in line and "nowhere" in line, line


# ---- slimjax compress -----------------------------------------------------------------------------

RECIPE = ("prune --method=magnitude --sparsity=0.5; distill --steps=8 --hidden=0.5 --config.checkpoint.every_steps=2 "
          "--config.train.sample_tokens=0")


def compress_argv(teacher_dir, out):
    return [sys.executable, DRIVER, "compress", f"--workdir={teacher_dir}", f"--out={out}", f"--stages={RECIPE}",
            "--report_docs=2", "--repeats=1"]


def test_compress_killed_in_its_second_stage_resumes_to_the_uninterrupted_result(teacher, tmp_path):
    import signal
    import subprocess

    from test_fault import run, steps_on_disk, wait_for

    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    result = run(compress_argv(teacher, straight))
    assert result.returncode == 0, result.stderr[-3000:]
    stage2 = os.path.join(killed, "stages", "2-distill")
    proc = subprocess.Popen(compress_argv(teacher, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: any(s >= 3 for s in steps_on_disk(stage2)), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert max(steps_on_disk(stage2)) < 8
    pruned = snapshot(os.path.join(killed, "stages", "1-prune"))
    result = run(compress_argv(teacher, killed))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "stage 1 prune: done earlier" in result.stdout
    assert snapshot(os.path.join(killed, "stages", "1-prune")) == pruned  # the finished stage is kept as it was
    for stage, step in (("1-prune", 0), ("2-distill", 8)):
        got = fingerprints(os.path.join(killed, "stages", stage), step)
        want = fingerprints(os.path.join(straight, "stages", stage), step)
        assert got == want, stage
    report = json.load(open(os.path.join(killed, "compress.json")))
    assert [s["stage"] for s in report["stages"]] == ["1-prune", "2-distill"]
    pruned_ratio = report["stages"][0]["ratios"]["nonzero_params"]
    assert 0.3 < pruned_ratio < 1.0  # half of the block weights are zeros; embeddings and norms are not pruned


@pytest.mark.parametrize("stages,named", [
    ("prune --sparsity=0.5; squash --bits=4", "'squash'"),
    ("distill --steps=4", "has no student"),
    ("quantize --bits=8; prune --sparsity=0.5", "comes after 'quantize'"),
    ("prune --sparsity=1.5", "--sparsity"),
], ids=["unknown-stage", "distill-first", "prune-after-quantize", "bad-stage-flag"])
def test_bad_compress_recipes_are_one_line_exit_2_and_write_nothing(teacher, tmp_path, capsys, stages, named):
    out = str(tmp_path / "out")
    line = one_line_error(cli_here(capsys, "compress", f"--workdir={teacher}", f"--out={out}", f"--stages={stages}"))
    assert named in line, line
    assert not os.path.exists(out)


# ---- slimjax lowrank (the CLI over slimjax.slim.factorize) ---------------------------------------

def test_slimjax_lowrank_writes_a_smaller_run_that_distillation_recovers(teacher, tmp_path, capsys):
    out, rec = str(tmp_path / "svd"), str(tmp_path / "svd-recovered")
    result = cli_here(capsys, "lowrank", f"--workdir={teacher}", f"--out={out}", "--method=whitened", "--budget=0.8",
                      "--calibration_samples=16")
    assert result.returncode == 0, result.stderr[-3000:]
    from slimjax.cli.rundir import open_run

    small, big = open_run(out), open_run(teacher)
    n = lambda rd: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(rd.built.shapes))  # noqa: E731
    report = json.load(open(os.path.join(out, "lowrank.json")))
    assert n(small) == report["model_params_after"] < n(big) == report["model_params_before"]
    assert [name for name, _ in small.spec.recipe] == ["lowrank"]
    result = cli_here(capsys, "distill", f"--teacher={teacher}", f"--student={out}", f"--out={rec}", "--steps=2")
    assert result.returncode == 0, result.stderr[-3000:]
    assert [name for name, _ in open_run(rec).spec.recipe] == ["lowrank", "distill"]


@pytest.mark.parametrize("flags,named", [
    (["--rank=64"], "rank=64"),
    (["--budget=1.5"], "budget=1.5"),
    (["--rank=4", "--budget=0.5"], "exactly one of"),
    (["--energy=0.9", "--method=qr"], "--method"),
], ids=["rank-too-large", "budget", "two-choices", "method"])
def test_bad_lowrank_input_is_one_line_exit_2(teacher, tmp_path, capsys, flags, named):
    out = str(tmp_path / "out")
    line = one_line_error(cli_here(capsys, "lowrank", f"--workdir={teacher}", f"--out={out}", *flags))
    assert named in line, line
    assert not os.path.exists(out)
