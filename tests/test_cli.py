"""The `slimjax` command end to end: outputs, resumption, and one-line errors for bad input."""

import glob
import json
import os
import subprocess
import sys

import pytest

from helpers import snapshot

FAST = ["--config.train.steps=6", "--config.train.log_every=2", "--config.train.eval_every=3",
        "--config.checkpoint.every_steps=3", "--config.train.eval_batches=2",
        "--config.train.global_batch_size=8", "--config.data.seq_len=64"]


def slimjax(*args, env_extra=None):
    """Runs the CLI in a subprocess (as a user would), with the test's 8 fake devices."""
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "slimjax.cli", *args], capture_output=True, text=True,
                          env=env, timeout=600)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, spm_path):
    """A workdir holding a complete 6-step run (outputs, checkpoints at steps 3 and 6)."""
    workdir = str(tmp_path_factory.mktemp("run"))
    result = slimjax("train", *FAST, f"--config.data.tokenizer={spm_path}", f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_train_writes_every_output(finished_run):
    workdir, result = finished_run
    assert "done: step 6" in result.stdout and "sample: ROMEO:" in result.stdout
    assert glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
    assert os.path.getsize(os.path.join(workdir, "loss_curve.png")) > 1000
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    train = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5, 6]
    for key in ("train/grad_norm", "train/learning_rate", "train/tokens"):
        assert all(key in r for r in train)
    for key in ("train/tokens_per_s", "train/step_time_s", "train/mfu"):
        assert all(key in r for r in train if r["step"] % 2 == 0)
    assert [r["step"] for r in records if "eval/loss" in r] == [3, 6]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    for key in ("config", "compile_time_s", "tokens_per_s", "mfu", "final_train_loss", "final_eval_loss"):
        assert key in summary, key
    assert summary["config"]["train"]["steps"] == 6 and summary["final_step"] == 6
    assert 0 < summary["mfu"] < 1 and summary["tokens_per_s"] > 0
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]


def test_second_run_resumes_from_the_checkpoint(finished_run, spm_path):
    workdir, _ = finished_run
    args = [a for a in FAST if not a.startswith("--config.train.steps")]
    result = slimjax("train", *args, "--config.train.steps=8", f"--config.data.tokenizer={spm_path}",
                     f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    summary = json.load(open(os.path.join(workdir, "summary.json")))
    assert summary["resumed"] and summary["start_step"] == 6 and summary["final_step"] == 8
    steps = [json.loads(line)["step"] for line in open(os.path.join(workdir, "metrics.jsonl"))
             if "train/loss" in line]
    assert steps == [1, 2, 3, 4, 5, 6, 7, 8]  # no step trained twice


BAD_INPUTS = {
    "unknown key": (["--config.train.stpes=3"], "unknown config key 'train.stpes' (did you mean 'train.steps'?)"),
    "mesh does not divide devices": (["--config.mesh.data=3"], "mesh (data=3, stage=1, fsdp=1, sequence=1, tensor=1) needs 3 devices"),
    "batch not divisible": (["--config.mesh.data=8", "--config.train.global_batch_size=12"],
                            "train.global_batch_size=12 is not divisible by data x fsdp (8)"),
    "sequence too long": (["--config.data.seq_len=512"], "data.seq_len=512 exceeds model.max_seq_len=256"),
    "unknown logical name": (["--config.mesh.rules=(('embedd', None),)"],
                             "mesh.rules overrides unknown logical axis name 'embedd' (did you mean 'embed'?)"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_harmless(case, finished_run, tmp_path):
    import shutil

    flags, expected = BAD_INPUTS[case]
    workdir = str(tmp_path / "copy")
    shutil.copytree(finished_run[0], workdir)
    before = snapshot(workdir)
    result = slimjax("train", *flags, f"--workdir={workdir}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimjax: error: "), result.stderr[-3000:]
    assert expected in lines[0]
    assert snapshot(workdir) == before


def test_unknown_logical_name_fails_before_the_workdir_exists(tmp_path):
    """The rules check runs before anything is created: a new workdir is not even made."""
    workdir = tmp_path / "new"
    result = slimjax("train", "--config.mesh.rules=(('embedd', None),)", f"--workdir={workdir}")
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("slimjax: error: ") and "'embedd'" in lines[0], result.stderr
    assert not workdir.exists()


def test_workdir_that_is_a_file(tmp_path):
    path = tmp_path / "notes.txt"
    path.write_text("my notes\n")
    result = slimjax("train", f"--workdir={path}")
    assert result.returncode == 2
    assert result.stderr.strip() == f"slimjax: error: --workdir '{path}' is a file; give a directory (new or from an earlier run)"
    assert path.read_text() == "my notes\n"


def test_console_script_and_absl_script_share_the_parser(tmp_path):
    import shutil

    exe = shutil.which("slimjax")
    assert exe, "the slimjax console script is installed with the package"
    result = subprocess.run([exe, "train", "--config.model.d_modle=3"], capture_output=True, text=True)
    assert result.returncode == 2 and "did you mean 'model.d_model'" in result.stderr
    script = os.path.join(os.path.dirname(__file__), "..", "scripts", "train.py")
    result = subprocess.run([sys.executable, script, "--config.model.d_modle=3"], capture_output=True, text=True)
    assert result.returncode == 2 and "did you mean 'model.d_model'" in result.stderr
