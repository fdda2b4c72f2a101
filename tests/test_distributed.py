"""How ``slimjax.train.distributed`` builds the ``jax.distributed.initialize`` arguments from config and
environment (a pure function), SLURM node lists against JAX's own parser, and one-line errors."""

import dataclasses
import os
import socket
import subprocess
import sys

import jax
import pytest

from helpers import child_env, free_port
from slimjax import config as C
from slimjax.configs import base
from slimjax.errors import SlimjaxError
from slimjax.train import distributed as D

DEFAULT = C.validate(base.get_config()).distributed


def dist(**kw) -> C.DistributedConfig:
    return dataclasses.replace(DEFAULT, **kw)


def slurm_env(procid: int, ntasks: int, per_node: str, nodeid: int, localid: int,
              nodelist: str = "gpu[003-004]") -> dict[str, str]:
    return {"SLURM_JOB_ID": "1234", "SLURM_PROCID": str(procid), "SLURM_NTASKS": str(ntasks),
            "SLURM_STEP_NODELIST": nodelist, "SLURM_JOB_NODELIST": nodelist, "SLURM_STEP_TASKS_PER_NODE": per_node,
            "SLURM_NODEID": str(nodeid), "SLURM_LOCALID": str(localid)}


def test_single_process_by_default():
    assert D.resolve(DEFAULT, {}) is None
    assert D.resolve(dist(num_processes=1), {}) is None


def test_config_gives_every_argument():
    plan = D.resolve(dist(coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3, timeout_s=60),
                     slurm_env(0, 2, "1(x2)", 0, 0))  # explicit config wins over a SLURM job
    assert plan.source == "config"
    assert plan.kwargs == {"coordinator_address": "10.0.0.2:1234", "num_processes": 4, "process_id": 3,
                           "local_device_ids": None, "cluster_detection_method": "deactivate",
                           "initialization_timeout": 60}


def test_environment_variables_fill_what_the_config_leaves_unset():
    env = {"SLIMJAX_COORDINATOR_ADDRESS": "host-a:999", "SLIMJAX_NUM_PROCESSES": "2", "SLIMJAX_PROCESS_ID": "1"}
    plan = D.resolve(dist(local_device_ids=(0, 1)), env)
    assert plan.source == "environment"
    assert (plan.kwargs["coordinator_address"], plan.kwargs["num_processes"], plan.kwargs["process_id"],
            plan.kwargs["local_device_ids"]) == ("host-a:999", 2, 1, [0, 1])
    assert D.resolve(dist(process_id=0), env).kwargs["process_id"] == 0  # the config key wins


def test_slurm_one_task_per_node_sees_every_gpu_of_its_node():
    plan = D.resolve(DEFAULT, slurm_env(procid=1, ntasks=2, per_node="1(x2)", nodeid=1, localid=0))
    assert plan.source == "slurm"
    # JAX's port rule for the same job (65535 - 4095 + SLURM_JOB_ID % 4096) and the first node.
    assert plan.kwargs["coordinator_address"] == f"gpu003:{65535 - 4095 + 1234 % 4096}"
    assert (plan.kwargs["num_processes"], plan.kwargs["process_id"]) == (2, 1)
    assert plan.kwargs["local_device_ids"] is None  # all of the node's GPUs (JAX alone would give [0])
    assert plan.kwargs["cluster_detection_method"] == "deactivate"


def test_slurm_one_task_per_gpu_takes_its_local_gpu():
    plan = D.resolve(dist(coordinator_port=7777), slurm_env(procid=11, ntasks=16, per_node="8(x2)", nodeid=1,
                                                            localid=3))
    assert plan.kwargs["local_device_ids"] == [3]
    assert plan.kwargs["coordinator_address"] == "gpu003:7777"
    assert plan.kwargs["process_id"] == 11


def test_slurm_with_an_explicit_coordinator_reads_the_rest_from_slurm():
    env = {**slurm_env(procid=1, ntasks=2, per_node="1(x2)", nodeid=1, localid=0), "SLIMJAX_COORDINATOR_ADDRESS":
           "gpu003:29500"}  # what scripts/slurm's sbatch script exports
    plan = D.resolve(DEFAULT, env)
    assert plan.source == "slurm"
    assert (plan.kwargs["coordinator_address"], plan.kwargs["num_processes"], plan.kwargs["process_id"]) == (
        "gpu003:29500", 2, 1)


def test_slurm_single_task_auto_off_and_cloud_tpu():
    assert D.resolve(DEFAULT, slurm_env(0, 1, "1", 0, 0)) is None
    assert D.resolve(dist(auto=False), slurm_env(0, 2, "1(x2)", 0, 0)) is None
    plan = D.resolve(DEFAULT, {}, on_cloud_tpu=True)  # JAX reads the TPU metadata itself
    assert plan.source == "tpu" and plan.kwargs == {"initialization_timeout": DEFAULT.timeout_s}
    assert D.resolve(dist(auto=False), {}, on_cloud_tpu=True) is None


@pytest.mark.parametrize("nodelist", ["node001", "node001,host2", "node[001-0015],host2",
                                      "node[001,007-015],host2", "a-b[7-9]", "tpu-vm-0"])
def test_first_host_agrees_with_jax_slurm_detector(nodelist, monkeypatch):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    monkeypatch.setenv("SLURM_STEP_NODELIST", nodelist)
    jax_host = SlurmCluster.get_coordinator_address(None, "1").rsplit(":", 1)[0]
    assert D.first_host(nodelist) == jax_host


def test_tasks_per_node():
    assert D.tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert D.tasks_per_node("8") == [8] and D.tasks_per_node("") == []
    with pytest.raises(SlimjaxError, match="tasks per node"):
        D.tasks_per_node("two")


@pytest.mark.parametrize("cfg,env,match", [
    (dict(coordinator_address="10.0.0.2", num_processes=2, process_id=0), {}, "must be host:port"),
    (dict(coordinator_address="10.0.0.2:1"), {}, "distributed.num_processes is not set"),
    (dict(num_processes=2, process_id=1), {}, "distributed.coordinator_address is not set"),
    ({}, {"SLIMJAX_COORDINATOR_ADDRESS": "h:1", "SLIMJAX_NUM_PROCESSES": "2", "SLIMJAX_PROCESS_ID": "2"},
     "out of range for 2 processes"),
    ({}, {"SLIMJAX_NUM_PROCESSES": "two"}, "SLIMJAX_NUM_PROCESSES='two' must be an integer"),
    ({}, {**slurm_env(5, 2, "1(x2)", 0, 0)}, "process id 5 .* out of range for 2 processes"),
])
def test_bad_values_are_one_line_errors(cfg, env, match):
    with pytest.raises(SlimjaxError, match=match) as e:
        D.resolve(dist(**cfg), env)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("key,value,match", [
    ("process_id", 4, "distributed.process_id' is 4"), ("num_processes", 0, "distributed.num_processes"),
    ("local_device_ids", (-1,), "distributed.local_device_ids"), ("timeout_s", 0, "distributed.timeout_s"),
])
def test_config_validation(key, value, match):
    c = base.get_config()
    c.distributed.num_processes = 4
    setattr(c.distributed, key, value)
    with pytest.raises(SlimjaxError, match=match):
        C.validate(c)


def test_initialize_after_jax_started_is_an_error_not_a_crash():
    jax.devices()  # this test process already uses its 8 devices
    assert D.initialize(dist(cpu_devices=8), env={}) is None  # same count: nothing to do
    with pytest.raises(SlimjaxError, match="already started with 8 CPU devices"):
        D.initialize(dist(cpu_devices=4), env={})
    with pytest.raises(SlimjaxError, match="already used in this process"):
        D.initialize(dist(coordinator_address=f"127.0.0.1:{free_port()}", num_processes=2, process_id=1), env={})


SCRIPT = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts", "train.py")


def train_cli(port: int, process_id: int, tmp_path, command=("slimjax", "train")) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*command, f"--config.distributed.coordinator_address=127.0.0.1:{port}",
         "--config.distributed.num_processes=2", f"--config.distributed.process_id={process_id}",
         "--config.distributed.timeout_s=2", "--config.distributed.cpu_devices=4", f"--workdir={tmp_path}/run"],
        env=child_env(), capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command,prog", [(("slimjax", "train"), "slimjax"), ((sys.executable, SCRIPT), "train.py")])
def test_unreachable_coordinator_exits_2_with_one_line(command, prog, tmp_path):
    result = train_cli(free_port(), 1, tmp_path, command)  # nobody listens there
    assert result.returncode == 2
    assert result.stderr.startswith(f"{prog}: error: process 1 cannot reach the coordinator '127.0.0.1:")
    assert result.stderr.count("\n") == 1
    assert not (tmp_path / "run").exists()  # failed before touching the workdir


def test_coordinator_port_in_use_exits_2_with_one_line(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        result = train_cli(s.getsockname()[1], 0, tmp_path)
    assert result.returncode == 2
    assert result.stderr.startswith("slimjax: error: process 0 cannot open the coordinator port")
    assert result.stderr.count("\n") == 1
