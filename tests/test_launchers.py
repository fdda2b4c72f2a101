"""scripts/tpu and scripts/slurm: the gcloud / sbatch commands they print with --dry-run, and one-line
errors (exit 2) for bad arguments. Nothing here ever runs gcloud or sbatch for real."""

import os
import shlex
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TPU = os.path.join(ROOT, "scripts", "tpu", "tpu.py")
SLURM = os.path.join(ROOT, "scripts", "slurm", "slurm.py")


def launcher(script: str, *args: str, path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=path) if path is not None else None
    return subprocess.run([sys.executable, script, *args], capture_output=True, text=True, timeout=60, env=env,
                          cwd=ROOT)


def dry(script: str, *args: str) -> list[list[str]]:
    """The printed commands, each split back into its argv."""
    args = list(args)
    args.insert(args.index("--") if "--" in args else len(args), "--dry-run")
    result = launcher(script, *args)
    assert result.returncode == 0, result.stderr
    return [shlex.split(line) for line in result.stdout.splitlines() if line.strip()]


def flag(cmd: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in cmd if a.startswith(f"--{name}=")]
    assert len(values) == 1, (name, cmd)
    return values[0]


GCLOUD = ["gcloud", "compute", "tpus", "tpu-vm"]


def test_tpu_single_host_create_and_delete():
    (create,) = dry(TPU, "create", "my-tpu", "--zone=us-west4-a", "--accelerator-type=v5litepod-8")
    assert create[:6] == GCLOUD + ["create", "my-tpu"]
    assert flag(create, "zone") == "us-west4-a" and flag(create, "accelerator-type") == "v5litepod-8"
    assert flag(create, "version") == "v2-alpha-tpuv5-lite" and "--spot" not in create
    (delete,) = dry(TPU, "delete", "my-tpu", "--zone=us-west4-a")
    assert delete == GCLOUD + ["delete", "my-tpu", "--zone=us-west4-a", "--quiet"]


def test_tpu_pod_slice_installs_and_launches_on_every_worker():
    (create,) = dry(TPU, "create", "pod", "--zone=us-central2-b", "--accelerator-type=v4-32", "--spot",
                    "--project=proj")
    assert flag(create, "version") == "tpu-ubuntu2204-base" and "--spot" in create
    assert flag(create, "project") == "proj"
    scp, ssh = dry(TPU, "install", "pod", "--zone=us-central2-b")
    assert scp[:6] == GCLOUD + ["scp", "pod"] and "--recurse" in scp and ROOT in scp
    assert "pod:~/slimjax" in scp and flag(scp, "worker") == "all"
    assert ssh[:6] == GCLOUD + ["ssh", "pod"] and flag(ssh, "worker") == "all"
    assert "'jax[tpu]'" in flag(ssh, "command") and flag(ssh, "command").endswith("pip install --upgrade ~/slimjax")
    (launch,) = dry(TPU, "launch", "pod", "--zone=us-central2-b", "--config=gpt2_small", "--workdir=/mnt/run",
                    "--", "--config.train.steps=1000", "--config.data.sources=('text:/data/*.txt',)")
    assert flag(launch, "worker") == "all"
    remote = shlex.split(flag(launch, "command"))  # what each worker's shell runs
    assert remote[0] == "nohup" and remote[-6:] == [">", "~/slimjax-train.log", "2>&1", "<", "/dev/null", "&"]
    assert remote[1:remote.index(">")] == ["python3", "-m", "slimjax.cli", "train", "--config=gpt2_small",
                                           "--workdir=/mnt/run", "--config.train.steps=1000",
                                           "--config.data.sources=('text:/data/*.txt',)"]
    subprocess.run(["bash", "-n", "-c", flag(launch, "command")], check=True)  # valid shell
    (logs,) = dry(TPU, "logs", "pod", "--zone=us-central2-b")
    assert flag(logs, "worker") == "0" and flag(logs, "command") == "tail -n 100 -f ~/slimjax-train.log"


def test_tpu_install_from_pip_requirement():
    (ssh,) = dry(TPU, "install", "my-tpu", "--zone=us-west4-a", "--source=slimjax==0.1.0")
    assert flag(ssh, "command").endswith("pip install --upgrade slimjax==0.1.0")


@pytest.mark.parametrize("args,match", [
    (["create", "my-tpu", "--zone=us-west4-a", "--accelerator-type=v9-8"], "--accelerator-type='v9-8'"),
    (["create", "My_TPU", "--zone=us-west4-a", "--accelerator-type=v4-8"], "TPU name 'My_TPU'"),
    (["create", "my-tpu", "--accelerator-type=v4-8"], "required: --zone"),
    (["launch", "my-tpu", "--zone=us-west4-a", "--", "--steps=3"], "got '--steps=3'"),
    (["logs", "my-tpu", "--zone=us-west4-a", "--worker=first"], "--worker='first'"),
    (["frob", "my-tpu"], "invalid choice: 'frob'"),
])
def test_tpu_bad_arguments_exit_2_with_one_line(args, match):
    result = launcher(TPU, *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("tpu.py: error: ") and match in result.stderr
    assert result.stderr.count("\n") == 1


def test_tpu_without_gcloud_says_so():
    result = launcher(TPU, "delete", "my-tpu", "--zone=us-west4-a", path="")  # nothing on PATH
    assert result.returncode == 2
    assert result.stderr == ("tpu.py: error: 'gcloud' is not on PATH; install it, or pass --dry-run to print "
                             "the commands\n")


def sbatch_lines(*args: str) -> tuple[list[str], list[str]]:
    result = launcher(SLURM, "--dry-run", *args)
    assert result.returncode == 0, result.stderr
    script, _, submit = result.stdout.rstrip("\n").rpartition("\n")
    subprocess.run(["bash", "-n", "-c", script], check=True)  # valid shell
    return script.splitlines(), shlex.split(submit)


def test_slurm_one_task_per_node():
    lines, submit = sbatch_lines("--nodes=2", "--gpus-per-node=8", "--partition=gpu", "--venv=/shared/venv",
                                 "--workdir=/shared/run", "--", "--config.train.steps=1000")
    assert submit == ["sbatch", "slimjax.sbatch"]
    assert lines[0] == "#!/bin/bash"
    for directive in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--partition=gpu"):
        assert f"#SBATCH {directive}" in lines
    assert "source /shared/venv/bin/activate" in lines
    assert 'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)' in lines
    assert 'export SLIMJAX_COORDINATOR_ADDRESS="$COORDINATOR_HOST:29500"' in lines
    (srun,) = [shlex.split(line) for line in lines if line.startswith("srun ")]
    assert srun[:4] == ["srun", "--kill-on-bad-exit=1", "--nodes=2", "--ntasks-per-node=1"]
    assert srun[4:] == ["python3", "-m", "slimjax.cli", "train", "--config=tiny", "--workdir=/shared/run",
                        "--config.train.steps=1000"]


def test_slurm_one_task_per_gpu():
    lines, submit = sbatch_lines("--nodes=4", "--gpus-per-node=8", "--tasks=per-gpu", "--port=12345",
                                 "--job-name=big", "--time=2-00:00:00")
    assert submit == ["sbatch", "big.sbatch"]
    assert "#SBATCH --ntasks-per-node=8" in lines and "#SBATCH --time=2-00:00:00" in lines
    assert 'export SLIMJAX_COORDINATOR_ADDRESS="$COORDINATOR_HOST:12345"' in lines
    assert any(line.startswith("srun --kill-on-bad-exit=1 --nodes=4 --ntasks-per-node=8 ") for line in lines)


@pytest.mark.parametrize("args,match", [
    (["--nodes=0", "--gpus-per-node=8"], "--nodes=0"),
    (["--nodes=1", "--gpus-per-node=8", "--time=1h"], "--time='1h'"),
    (["--nodes=1"], "required: --gpus-per-node"),
    (["--nodes=1", "--gpus-per-node=8", "--tasks=per-core"], "invalid choice: 'per-core'"),
    (["--nodes=1", "--gpus-per-node=8", "--port=70000"], "--port=70000"),
    (["--nodes=1", "--gpus-per-node=8", "--", "train"], "got 'train'"),
])
def test_slurm_bad_arguments_exit_2_with_one_line(args, match):
    result = launcher(SLURM, "--dry-run", *args)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("slurm.py: error: ") and match in result.stderr
    assert result.stderr.count("\n") == 1


def test_slurm_without_sbatch_writes_nothing(tmp_path):
    script = tmp_path / "job.sbatch"
    result = launcher(SLURM, "--nodes=1", "--gpus-per-node=1", f"--script={script}", path="")
    assert result.returncode == 2 and "'sbatch' is not on PATH" in result.stderr
    assert not script.exists()
