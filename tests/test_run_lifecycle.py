"""Starting and re-starting runs: a finished run re-run changes nothing and says so in one line,
entry points are quiet (no absl/Orbax INFO lines, no blank-line floods in the sample), and a run
that fails validation leaves no workdir behind."""

import os
import subprocess
import sys

import pytest
from helpers import snapshot

import slimjax
from slimjax.errors import SlimjaxError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAST = ["--config.train.steps=2", "--config.train.global_batch_size=8", "--config.data.seq_len=32",
        "--config.train.eval_batches=1", "--config.train.sample_tokens=24", "--config.train.progress=false"]


def script(*args):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=dict(os.environ), timeout=600,
                          cwd=ROOT)


@pytest.fixture(scope="module")
def finished(tmp_path_factory, spm_path):
    """A complete 2-step run trained through scripts/train.py (absl.app), and its output."""
    workdir = str(tmp_path_factory.mktemp("life") / "run")
    result = script("scripts/train.py", "--config=configs/tiny.py", *FAST, f"--config.data.tokenizer={spm_path}",
                    f"--workdir={workdir}")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result, spm_path


def test_training_output_is_quiet(finished):
    _, result, _ = finished
    assert [line for line in result.stderr.splitlines() if line.strip()] == []  # no INFO lines (progress off)
    sample = result.stdout.split("sample: ", 1)[1]
    assert sample.startswith("ROMEO:") and "\n\n" not in sample


@pytest.mark.parametrize("entry", ["cli", "script"])
def test_rerunning_a_finished_run_changes_nothing(finished, entry):
    workdir, _, spm_path = finished
    before = snapshot(workdir)
    args = [*FAST, f"--config.data.tokenizer={spm_path}", f"--workdir={workdir}"]
    if entry == "cli":
        result = script("-m", "slimjax.cli", "train", *args)
    else:
        result = script("scripts/train.py", "--config=configs/tiny.py", *args)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = (result.stdout + result.stderr).strip().splitlines()
    assert len(lines) == 1 and "already complete at step 2" in lines[0], lines
    assert snapshot(workdir) == before


def test_a_finished_run_returns_its_summary_and_a_changed_model_is_refused(finished):
    workdir, _, spm_path = finished
    config = slimjax.configs.tiny.get_config()
    config.train.steps, config.train.global_batch_size, config.data.seq_len = 2, 8, 32
    config.data.tokenizer = spm_path
    before = snapshot(workdir)
    summary = slimjax.train(config, workdir)
    assert summary["final_step"] == 2 and summary["already_complete"] is True
    config.model.n_layers += 1
    with pytest.raises(SlimjaxError, match="model.n_layers"):
        slimjax.train(config, workdir)
    assert snapshot(workdir) == before


@pytest.mark.parametrize("key,value,message", [
    ("mesh.data", 3, "needs 3 devices but 8 are available"),
    ("train.global_batch_size", 12, "not divisible by data x fsdp"),
    ("mesh.rules", (("no_such_axis", None),), "no_such_axis"),
    ("data.sources", ("text:/no/such/dir/*.txt",), "/no/such/dir"),
])
def test_a_validation_error_creates_no_workdir(tmp_path, spm_path, key, value, message):
    config = slimjax.configs.tiny.get_config()
    config.train.steps, config.data.seq_len, config.data.tokenizer = 1, 32, spm_path
    section, name = key.split(".")
    setattr(getattr(config, section), name, value)
    workdir = tmp_path / "run"
    with pytest.raises(SlimjaxError, match=message):
        slimjax.train(config, str(workdir))
    assert not workdir.exists()
