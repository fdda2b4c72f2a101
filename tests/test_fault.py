"""Fault tolerance with real processes: kill -9 mid-training and mid-checkpoint-write, SIGTERM
preemption, and bad checkpoint input through the CLI (one line, exit 2, nothing changed)."""

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from helpers import run_processes, snapshot

# The small test model on Shakespeare with the byte tokenizer (no tokenizer training), 2x2x2 mesh.
FLAGS = ["--config.model.vocab_size=260", "--config.model.d_model=64", "--config.model.n_layers=2",
         "--config.model.n_heads=8", "--config.model.n_kv_heads=4", "--config.model.head_dim=8",
         "--config.model.d_ff=128", "--config.model.max_seq_len=64", "--config.model.dtype=float32",
         "--config.model.tie_embeddings=False", "--config.data.tokenizer_kind=byte", "--config.data.seq_len=32",
         "--config.train.global_batch_size=16", "--config.optimizer.warmup_steps=1", "--config.train.log_every=1",
         "--config.train.eval_every=1000", "--config.train.eval_batches=1", "--config.train.progress=False",
         "--config.mesh.data=2", "--config.mesh.fsdp=2", "--config.mesh.tensor=2"]
STEPS = 40
EVERY = 4
DRIVER = os.path.join(os.path.dirname(__file__), "train_driver.py")


def argv(workdir, steps=STEPS, every=EVERY, *extra):
    return [sys.executable, DRIVER, "train", *FLAGS, f"--config.train.steps={steps}",
            f"--config.checkpoint.every_steps={every}", f"--workdir={workdir}", *extra]


def run(args, **kw):
    return subprocess.run(args, capture_output=True, text=True, timeout=600, **kw)


def steps_on_disk(workdir):
    d = os.path.join(workdir, "checkpoints")
    return sorted(int(n) for n in os.listdir(d) if n.isdigit()) if os.path.isdir(d) else []


def fingerprints(workdir, step):
    """The per-leaf bit fingerprints slimjax records in every checkpoint (params, optimizer, step, RNG)."""
    return json.load(open(os.path.join(workdir, "checkpoints", str(step), "meta", "metadata")))["fingerprints"]


def kill9_then_resume(argv_for, tmp_path, steps, kill_after):
    """Runs ``argv_for(workdir)`` straight through, and again killed with -9 once a checkpoint at
    step >= ``kill_after`` is on disk then resumed; returns (straight, killed) workdirs, both at ``steps``."""
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    result = run(argv_for(straight))
    assert result.returncode == 0, result.stderr[-3000:]
    proc = subprocess.Popen(argv_for(killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    wait_for(lambda: any(s >= kill_after for s in steps_on_disk(killed)), proc)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert max(steps_on_disk(killed)) < steps  # killed mid-way
    result = run(argv_for(killed))
    assert result.returncode == 0, result.stderr[-3000:]
    return straight, killed


def wait_for(predicate, proc, timeout=300):
    t0 = time.time()
    while not predicate():
        assert proc.poll() is None, f"process ended early: {proc.returncode}"
        assert time.time() - t0 < timeout, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted 40-step run with checkpoints every 4 steps."""
    workdir = str(tmp_path_factory.mktemp("reference"))
    result = run(argv(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


def test_kill9_at_several_steps_then_resume_is_bit_identical(reference, tmp_path):
    workdir = str(tmp_path / "killed")
    killed_after = []
    for at_least in (8, 20):
        proc = subprocess.Popen(argv(workdir), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_for(lambda: any(s >= at_least for s in steps_on_disk(workdir)), proc)
        proc.send_signal(signal.SIGKILL)
        assert proc.wait() == -signal.SIGKILL
        killed_after.append(max(steps_on_disk(workdir)))
    assert killed_after[0] < killed_after[1] < STEPS
    result = run(argv(workdir))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["start_step"] == killed_after[1] and summary["final_step"] == STEPS
    assert fingerprints(workdir, STEPS) == fingerprints(reference, STEPS)  # bit for bit


def test_kill9_during_a_checkpoint_write_leaves_the_previous_one(tmp_path):
    workdir, marker = str(tmp_path / "w"), str(tmp_path / "writing")
    env = dict(os.environ, SLIMJAX_TEST_SLOW_SAVE_STEP="4", SLIMJAX_TEST_MARKER=marker)
    proc = subprocess.Popen(argv(workdir, every=2), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    wait_for(lambda: os.path.exists(marker), proc)
    partial = glob.glob(os.path.join(workdir, "checkpoints", "4.orbax-checkpoint-tmp*"))
    assert partial and steps_on_disk(workdir) == [2]
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    result = run(argv(workdir, 6, 2))
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["start_step"] == 2 and summary["final_step"] == 6
    assert steps_on_disk(workdir)[-1] == 6


def test_sigterm_saves_the_current_step_and_exits_143(tmp_path):
    workdir = str(tmp_path / "w")
    proc = subprocess.Popen(argv(workdir, 100000, 100000), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    metrics = os.path.join(workdir, "metrics.jsonl")
    wait_for(lambda: os.path.exists(metrics) and len(open(metrics).readlines()) >= 3, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 143, stderr[-3000:]
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("slimjax: preempted (SIGTERM): checkpoint saved at step "), stderr[-3000:]
    step = int(last.split("at step ")[1].split()[0])
    assert steps_on_disk(workdir) == [step] and 3 <= step < 100000
    logged = max(json.loads(line)["step"] for line in open(metrics))
    assert logged == step  # the checkpoint is of the last step trained, nothing lost
    assert "Traceback" not in stderr


def one_line_error(result):
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimjax: error: "), result.stderr[-3000:]
    return lines[0]


def test_checkpoint_of_a_different_model_shape(reference, tmp_path):
    before = snapshot(reference)
    line = one_line_error(run(argv(str(tmp_path / "ft"), 2, 2, "--config.model.d_ff=96",
                                   f"--config.checkpoint.init_from={reference}")))
    assert f"checkpoint {reference}/checkpoints/{STEPS}/params: parameter 'blocks/mlp/" in line
    assert " there and " in line and "96" in line and " in this model" in line
    assert snapshot(reference) == before


def test_config_that_changes_the_model_between_save_and_resume(reference, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    before = snapshot(workdir)
    line = one_line_error(run(argv(workdir, STEPS + 2, EVERY, "--config.model.n_layers=3")))
    assert f"checkpoints/{STEPS} was written with model.n_layers=2, the config now says 3" in line
    assert snapshot(workdir) == before


def test_corrupted_checkpoint_file(reference, tmp_path):
    workdir = str(tmp_path / "w")
    shutil.copytree(reference, workdir)
    data = [f for f in glob.glob(os.path.join(workdir, "checkpoints", str(STEPS), "params", "**", "d", "*"),
                                 recursive=True) if os.path.isfile(f)]
    path = max(data, key=os.path.getsize)
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0x40
    open(path, "wb").write(raw)
    before = snapshot(workdir)
    line = one_line_error(run(argv(workdir, STEPS + 2)))
    assert f"checkpoints/{STEPS}" in line and ("corrupted" in line or "cannot read" in line)
    assert snapshot(workdir) == before


def test_non_writable_workdir(reference, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference, workdir)
    # Root may write anywhere chmod forbids, so as root the directory is made immutable instead.
    lock, unlock = (["chattr", "+i", workdir], ["chattr", "-i", workdir]) if os.geteuid() == 0 else \
        (["chmod", "555", workdir], ["chmod", "755", workdir])
    subprocess.run(lock, check=True)
    try:
        before = snapshot(workdir)
        line = one_line_error(run(argv(workdir, STEPS + 2)))
        assert f"--workdir '{workdir}' is not writable" in line
        assert snapshot(workdir) == before
    finally:
        subprocess.run(unlock, check=True)


def test_sigterm_to_one_of_two_processes_stops_both_at_the_same_step(tmp_path):
    workdir = str(tmp_path / "two")
    worker = os.path.join(os.path.dirname(__file__), "preempt_worker.py")
    run_processes(lambda i, port: [sys.executable, worker, str(i), "2", str(port), workdir], 2)
    steps = [json.load(open(f"{workdir}.process{i}.json"))["preempted_at"] for i in range(2)]
    # Only process 1 was signalled; the processes agree at a log step (every 2) and save together.
    assert steps[0] == steps[1] and steps[0] is not None and steps[0] % 2 == 0
    assert steps_on_disk(workdir) == [steps[0]]
