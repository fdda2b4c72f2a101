"""Cloud TPU VMs for slimjax: create, install, launch, logs, delete, with the gcloud commands spelled out.

    python scripts/tpu/tpu.py create my-tpu --zone=us-west4-a --accelerator-type=v5litepod-8
    python scripts/tpu/tpu.py install my-tpu --zone=us-west4-a
    python scripts/tpu/tpu.py launch my-tpu --zone=us-west4-a --config=gpt2_small --workdir=/mnt/shared/run \\
        -- --config.train.steps=1000
    python scripts/tpu/tpu.py logs my-tpu --zone=us-west4-a
    python scripts/tpu/tpu.py delete my-tpu --zone=us-west4-a

Every subcommand takes ``--dry-run`` (print the commands instead of running them). Single-host VMs
(``v5litepod-8``, ``v4-8``) and pod slices (``v5litepod-32``, ``v4-64``) take the same commands:
install and launch run on ``--worker=all``, so on a pod slice every host runs the same training
command and ``slimjax train`` joins them with ``jax.distributed.initialize()`` (TPU auto-detection).
"""

from __future__ import annotations

import os
import re
import shlex
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch_util import Parser, fail, run_commands  # noqa: E402

PROG = "tpu.py"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LOG = "~/slimjax-train.log"
REMOTE_SOURCE = "~/slimjax"

# Default TPU VM software version per accelerator family (Cloud TPU docs, "TPU software versions").
RUNTIMES = {"v2": "tpu-ubuntu2204-base", "v3": "tpu-ubuntu2204-base", "v4": "tpu-ubuntu2204-base",
            "v5litepod": "v2-alpha-tpuv5-lite", "v5p": "v2-alpha-tpuv5", "v6e": "v2-alpha-tpuv6e"}
ACCELERATOR = re.compile(r"(v2|v3|v4|v5litepod|v5p|v6e)-(\d+)")
NAME = re.compile(r"[a-z]([-a-z0-9]{0,61}[a-z0-9])?")
ZONE = re.compile(r"[a-z]+-[a-z]+\d+-[a-z]")


def tpu_vm(verb: str, args) -> list[str]:
    """``gcloud compute tpus tpu-vm VERB NAME --zone=Z [--project=P]``."""
    cmd = ["gcloud", "compute", "tpus", "tpu-vm", verb, args.name, f"--zone={args.zone}"]
    return cmd + ([f"--project={args.project}"] if args.project else [])


def ssh(args, worker: str, command: str) -> list[str]:
    """The same shell command on ``worker`` ("all" = every host of a pod slice)."""
    return tpu_vm("ssh", args) + [f"--worker={worker}", f"--command={command}"]


def create(args) -> list[list[str]]:
    family = ACCELERATOR.fullmatch(args.accelerator_type).group(1)
    cmd = tpu_vm("create", args) + [f"--accelerator-type={args.accelerator_type}",
                                    f"--version={args.version or RUNTIMES[family]}"]
    return [cmd + (["--spot"] if args.spot else [])]


def install(args) -> list[list[str]]:
    """Copies a local checkout to every worker (or takes a pip requirement) and installs it with JAX for TPU."""
    steps, target = [], shlex.quote(args.source)
    if os.path.isdir(args.source):
        steps.append(tpu_vm("scp", args) + ["--recurse", os.path.abspath(args.source),
                                            f"{args.name}:{REMOTE_SOURCE}", "--worker=all"])
        target = REMOTE_SOURCE  # unquoted: the worker's shell expands ~
    pip = "python3 -m pip install --upgrade"
    steps.append(ssh(args, "all", f"{pip} pip && {pip} 'jax[tpu]' && {pip} {target}"))
    return steps


def launch(args) -> list[list[str]]:
    """The same ``slimjax train`` on every worker, in the background (nohup), logging to ~/slimjax-train.log."""
    bad = [o for o in args.overrides if not o.startswith("--config.")]
    if bad:
        fail(PROG, f"launch passes only --config.KEY=VALUE overrides after '--', got {bad[0]!r}")
    train = shlex.join(["python3", "-m", "slimjax.cli", "train", f"--config={args.config}",
                        f"--workdir={args.workdir}", *args.overrides])
    return [ssh(args, args.worker, f"nohup {train} > {LOG} 2>&1 < /dev/null &")]


def logs(args) -> list[list[str]]:
    follow = "-f " if args.follow else ""
    return [ssh(args, args.worker, f"tail -n {args.lines} {follow}{LOG}")]


def delete(args) -> list[list[str]]:
    return [tpu_vm("delete", args) + ["--quiet"]]


def parser() -> Parser:
    common = Parser(add_help=False)
    common.add_argument("name", help="TPU VM name (lowercase letters, digits, '-')")
    common.add_argument("--zone", required=True, help="zone, e.g. us-west4-a")
    common.add_argument("--project", default="", help="GCP project (default: gcloud's configured one)")
    common.add_argument("--dry-run", action="store_true", help="print the gcloud commands, run nothing")
    p = Parser(prog=PROG, description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True, parser_class=Parser)
    c = sub.add_parser("create", parents=[common], help="create a TPU VM (single host or pod slice)")
    c.add_argument("--accelerator-type", required=True, help="e.g. v5litepod-8 (one host), v5litepod-32, v4-64")
    c.add_argument("--version", default="", help="TPU software version (default: by accelerator family)")
    c.add_argument("--spot", action="store_true", help="a Spot VM: cheaper, can be preempted (SIGTERM)")
    i = sub.add_parser("install", parents=[common], help="install JAX for TPU and slimjax on every worker")
    i.add_argument("--source", default=REPO, help="a local checkout to copy (default: this one) or a pip requirement")
    la = sub.add_parser("launch", parents=[common], help="start `slimjax train` on every worker")
    la.add_argument("--config", default="tiny", help="bundled config name or a path on the workers")
    la.add_argument("--workdir", default="runs/tpu", help="run directory on the workers (shared for pod slices)")
    la.add_argument("--worker", default="all", help="'all' (default) or one worker index")
    lo = sub.add_parser("logs", parents=[common], help="tail the training log of a worker")
    lo.add_argument("--worker", default="0", help="worker index (0 prints the metrics) or 'all'")
    lo.add_argument("--lines", type=int, default=100, help="lines of history to show")
    lo.add_argument("--no-follow", dest="follow", action="store_false", help="print and return")
    sub.add_parser("delete", parents=[common], help="delete the TPU VM")
    return p


def check(args) -> None:
    if not NAME.fullmatch(args.name):
        fail(PROG, f"TPU name {args.name!r} must be lowercase letters, digits and '-', starting with a letter")
    if not ZONE.fullmatch(args.zone):
        fail(PROG, f"--zone={args.zone!r} does not look like a zone (e.g. us-west4-a)")
    if args.command == "create" and not ACCELERATOR.fullmatch(args.accelerator_type):
        fail(PROG, f"--accelerator-type={args.accelerator_type!r} is not a TPU type such as v5litepod-8, "
                   f"v4-32 or v6e-16 (families: {', '.join(RUNTIMES)})")
    worker = getattr(args, "worker", "all")
    if worker != "all" and not worker.isdigit():
        fail(PROG, f"--worker={worker!r} must be 'all' or a worker index")
    if getattr(args, "lines", 1) < 1:
        fail(PROG, f"--lines={args.lines} must be >= 1")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # launch: everything after "--" is passed to `slimjax train` (argparse subparsers mishandle it).
    overrides = argv[argv.index("--") + 1:] if "--" in argv else []
    args = parser().parse_args(argv[:argv.index("--")] if "--" in argv else argv)
    if overrides and args.command != "launch":
        fail(PROG, f"only launch takes '--' followed by --config.KEY=VALUE overrides, not {args.command}")
    args.overrides = overrides
    check(args)
    commands = {"create": create, "install": install, "launch": launch, "logs": logs, "delete": delete}
    return run_commands(PROG, commands[args.command](args), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())
