"""Joins a multi-process run: ``jax.distributed.initialize`` driven by config or environment.

Must run before any other JAX call that touches devices (the mesh, parameter init). The
arguments are worked out by :func:`resolve`, a pure function of the ``distributed.`` config
section and an environment mapping, in this order for each of coordinator / process count /
process id:

1. the config keys (``distributed.coordinator_address``, ``num_processes``, ``process_id``);
2. the variables ``SLIMJAX_COORDINATOR_ADDRESS``, ``SLIMJAX_NUM_PROCESSES``, ``SLIMJAX_PROCESS_ID``;
3. with ``distributed.auto``: a SLURM job step (``SLURM_*`` fill what 1 and 2 leave unset) or a
   Cloud TPU VM.

On Cloud TPU VMs JAX finds everything itself (the TPU metadata server), so slimjax calls
``jax.distributed.initialize()`` with no arguments. Under SLURM JAX's own detector reads only
``SLURM_STEP_NODELIST`` and always restricts a process to the GPU numbered ``SLURM_LOCALID``; that
is right for one task per GPU but leaves a one-task-per-node job using one GPU per node, so slimjax
builds all four arguments itself: one task per node sees every GPU of its node.

On CPU (tests), ``distributed.cpu_devices`` sets the number of local CPU devices and a multi-process
run uses gloo for cross-process collectives.
"""

from __future__ import annotations

import dataclasses
import glob
import importlib.util
import os
import re
import socket
import time
from typing import Any, Mapping

from slimjax.config import DistributedConfig
from slimjax.errors import SlimjaxError

ENV_ADDRESS = "SLIMJAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "SLIMJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "SLIMJAX_PROCESS_ID"


@dataclasses.dataclass(frozen=True)
class Plan:
    """How to call ``jax.distributed.initialize``: its keyword arguments and where they came from."""

    source: str  # "config", "environment", "slurm" or "tpu"
    kwargs: dict[str, Any]

    def describe(self) -> str:
        """A short label for errors and logs: the source and the coordinator."""
        where = self.kwargs.get("coordinator_address", "found by JAX")
        n, pid = self.kwargs.get("num_processes", "?"), self.kwargs.get("process_id", "?")
        return f"{self.source}: process {pid} of {n}, coordinator {where}"


def resolve(cfg: DistributedConfig, env: Mapping[str, str], on_cloud_tpu: bool = False) -> Plan | None:
    """The ``jax.distributed.initialize`` arguments for this process, or None for a single-process run.

    Pure: reads only ``cfg`` and ``env``; bad values raise :class:`SlimjaxError` naming the key or
    variable.
    """
    address = cfg.coordinator_address or env.get(ENV_ADDRESS, "")
    count = cfg.num_processes if cfg.num_processes != -1 else _env_int(env, ENV_NUM_PROCESSES)
    pid = cfg.process_id if cfg.process_id != -1 else _env_int(env, ENV_PROCESS_ID)
    local = list(cfg.local_device_ids) or None
    timeout = {"initialization_timeout": cfg.timeout_s}
    slurm = cfg.auto and all(k in env for k in ("SLURM_JOB_ID", "SLURM_PROCID", "SLURM_NTASKS"))
    address_key = "distributed.coordinator_address" if cfg.coordinator_address else ENV_ADDRESS
    if slurm and not (address and count is not None and pid is not None):
        return _slurm_plan(cfg, env, address, address_key, count, pid, local, timeout)
    if address or count is not None or pid is not None:
        from_config = bool(cfg.coordinator_address) or cfg.num_processes != -1 or cfg.process_id != -1
        source = "config" if from_config else "environment"
        if count == 1 and not address:
            return None  # explicitly one process: nothing to join
        missing = [name for name, v in (("coordinator_address", address), ("num_processes", count),
                                        ("process_id", pid)) if v in ("", None)]
        if missing:
            raise SlimjaxError(f"distributed.{missing[0]} is not set (nor its SLIMJAX_ variable) while the "
                               f"{source} gives the others; a multi-process run needs coordinator_address, "
                               "num_processes and process_id")
        return _plan(source, address, address_key, count, pid, local, timeout)
    if cfg.auto and on_cloud_tpu:
        return Plan("tpu", dict(timeout))
    return None


def _plan(source: str, address: str, address_key: str, count: int, pid: int, local: list[int] | None,
          timeout: dict[str, Any]) -> Plan:
    _check_address(address, address_key)
    if count < 1:
        raise SlimjaxError(f"process count {count} (distributed.num_processes or {ENV_NUM_PROCESSES}) must be >= 1")
    if not 0 <= pid < count:
        raise SlimjaxError(f"process id {pid} (distributed.process_id, {ENV_PROCESS_ID} or SLURM_PROCID) is out "
                           f"of range for {count} processes; use 0..{count - 1}")
    # "deactivate": every argument is given, so JAX must not let SLURM variables override them.
    return Plan(source, {"coordinator_address": address, "num_processes": count, "process_id": pid,
                         "local_device_ids": local, "cluster_detection_method": "deactivate", **timeout})


def _slurm_plan(cfg: DistributedConfig, env: Mapping[str, str], address: str, address_key: str,
                count: int | None, pid: int | None, local: list[int] | None, timeout: dict[str, Any]
                ) -> Plan | None:
    """A SLURM job step fills whatever the config and SLIMJAX_ variables leave unset."""
    count = _env_int(env, "SLURM_NTASKS") if count is None else count
    if count is None or count <= 1:
        return None
    if not address:
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "")
        if not nodelist:
            raise SlimjaxError("SLURM job without SLURM_STEP_NODELIST or SLURM_JOB_NODELIST; launch the "
                               "processes with srun (see scripts/slurm)")
        # The same port JAX's own SLURM detector derives, so a mixed launch still agrees.
        port = cfg.coordinator_port or 65535 - 4095 + _env_int(env, "SLURM_JOB_ID") % 4096
        address, address_key = f"{first_host(nodelist)}:{port}", "SLURM_STEP_NODELIST"
    pid = _env_int(env, "SLURM_PROCID") if pid is None else pid
    if local is None:
        per_node = tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", ""))
        node = _env_int(env, "SLURM_NODEID") or 0
        here = per_node[node] if node < len(per_node) else 1
        if here > 1:  # one task per GPU: this task takes the GPU numbered by its local rank
            local = [_env_int(env, "SLURM_LOCALID") or 0]
    return _plan("slurm", address, address_key, count, pid, local, timeout)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: ``gpu[003-010,012],cpu1`` -> ``gpu003``."""
    match = re.match(r"([^,\[]*)(\[([^\]]*)\])?", nodelist.strip())
    prefix, bracket = match.group(1), match.group(3)
    if not bracket:
        if not prefix:
            raise SlimjaxError(f"cannot read a host from SLURM node list '{nodelist}'")
        return prefix
    return prefix + re.split(r"[,-]", bracket)[0]


def tasks_per_node(spec: str) -> list[int]:
    """SLURM's compressed tasks-per-node list: ``2(x3),1`` -> [2, 2, 2, 1]; '' -> []."""
    out: list[int] = []
    for part in filter(None, spec.split(",")):
        match = re.fullmatch(r"(\d+)(?:\(x(\d+)\))?", part.strip())
        if not match:
            raise SlimjaxError(f"cannot read SLURM tasks per node '{spec}'")
        out += [int(match.group(1))] * int(match.group(2) or 1)
    return out


def on_cloud_tpu() -> bool:
    """True on a Cloud TPU VM: libtpu installed and TPU chips present (JAX checks the same)."""
    chips = glob.glob("/dev/accel*") or glob.glob("/dev/vfio/[0-9]*")
    return bool(chips) and importlib.util.find_spec("libtpu") is not None


def initialize(cfg: DistributedConfig, env: Mapping[str, str] | None = None) -> Plan | None:
    """Sets the CPU device count and joins the multi-process run ``cfg`` describes (if any).

    Idempotent: a process already initialised (by an earlier call or by the user) is left as it is.
    Returns the plan used, or None for a single-process run.
    """
    import jax

    env = os.environ if env is None else env
    if jax.distributed.is_initialized():
        return None
    plan = resolve(cfg, env, on_cloud_tpu())
    if cfg.cpu_devices:
        _set_cpu_devices(cfg.cpu_devices)
    if plan is None:
        return None
    if _backend_started():
        raise SlimjaxError(f"cannot join the multi-process run ({plan.describe()}): JAX devices were already "
                           "used in this process; start training in a fresh process")
    if "coordinator_address" in plan.kwargs:
        # JAX aborts the whole process (no exception) when it cannot reach the coordinator or bind
        # its port, so check both first and fail with a message instead of a C++ stack trace.
        probe_coordinator(plan.kwargs["coordinator_address"], plan.kwargs["process_id"], cfg.timeout_s)
    # Cross-process collectives between CPU devices need gloo; GPU and TPU devices ignore this.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(**plan.kwargs)
    except Exception as e:  # JAX raises several runtime types; the message is what matters to the user
        detail = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise SlimjaxError(f"jax.distributed.initialize failed ({plan.describe()}, timeout "
                           f"{cfg.timeout_s}s): {detail}; check that every process started and that the "
                           "coordinator address is reachable") from None
    return plan


def probe_coordinator(address: str, process_id: int, timeout_s: float) -> None:
    """Process 0: the coordinator port must be free here. Others: it must accept a TCP connection
    within ``timeout_s`` (process 0 may start a little later). Raises SlimjaxError otherwise."""
    host, _, port_text = address.rpartition(":")
    host, port = host.strip("[]"), int(port_text)
    if process_id == 0:
        try:
            with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                s.bind(("", port))
        except OSError as e:
            raise SlimjaxError(f"process 0 cannot open the coordinator port {port} of {address!r} "
                               f"({e.strerror.lower() if e.strerror else e}); pick a free port in "
                               "distributed.coordinator_address") from None
        return
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection((host, port), timeout=min(5.0, timeout_s)).close()
            return
        except OSError as e:
            if time.monotonic() >= deadline:
                raise SlimjaxError(f"process {process_id} cannot reach the coordinator {address!r} within "
                                   f"{timeout_s:g}s ({e.strerror or e}); start process 0 there, or fix "
                                   "distributed.coordinator_address / distributed.timeout_s") from None
            time.sleep(0.25)


def _set_cpu_devices(n: int) -> None:
    import jax

    if _backend_started():
        if jax.local_device_count("cpu") != n:
            raise SlimjaxError(f"distributed.cpu_devices={n} but JAX already started with "
                               f"{jax.local_device_count('cpu')} CPU devices; set it before any JAX call")
        return
    jax.config.update("jax_num_cpu_devices", n)


def _backend_started() -> bool:
    from jax._src import xla_bridge  # no public query for "devices already created"

    return xla_bridge.backends_are_initialized()


def _env_int(env: Mapping[str, str], name: str) -> int | None:
    text = env.get(name, "")
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        raise SlimjaxError(f"environment variable {name}={text!r} must be an integer") from None


def _check_address(address: str, key: str) -> None:
    host, sep, port = address.rpartition(":")
    if not (sep and host and port.isdigit() and 0 < int(port) < 65536):
        raise SlimjaxError(f"{key}={address!r} must be host:port (e.g. 10.0.0.2:1234)")
