"""SLURM GPU clusters for slimjax: write an sbatch script for a multi-node run and submit it.

    python scripts/slurm/slurm.py --nodes=2 --gpus-per-node=8 --partition=gpu --workdir=/shared/run \\
        --config=gpt2_small -- --config.train.steps=1000
    python scripts/slurm/slurm.py --nodes=4 --gpus-per-node=8 --tasks=per-gpu --dry-run

``--dry-run`` prints the script and the ``sbatch`` command instead of writing and submitting them.
The script starts one process per node (``--tasks=per-node``: each sees all GPUs of its node) or one
per GPU (``--tasks=per-gpu``) with ``srun``; the coordinator is the first node of
``SLURM_JOB_NODELIST``, exported as ``SLIMJAX_COORDINATOR_ADDRESS``, and ``slimjax train`` reads
the process count, process id and local GPU from ``SLURM_NTASKS``, ``SLURM_PROCID`` and
``SLURM_LOCALID`` (``slimjax.train.distributed``).
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from launch_util import Parser, fail, run_commands  # noqa: E402

PROG = "slurm.py"
TIME = re.compile(r"(\d+-)?\d+(:\d{2}){0,2}")
WORD = re.compile(r"[A-Za-z0-9_.-]+")


def sbatch_script(args) -> str:
    """The batch script: #SBATCH resources, the coordinator from the first node, then srun."""
    tasks_per_node = args.gpus_per_node if args.tasks == "per-gpu" else 1
    directives = [f"--job-name={args.job_name}", f"--nodes={args.nodes}", f"--ntasks-per-node={tasks_per_node}",
                  f"--gpus-per-node={args.gpus_per_node}", f"--cpus-per-task={args.cpus_per_task}",
                  f"--time={args.time}", f"--output={args.output}"]
    directives += [f"--partition={args.partition}"] if args.partition else []
    directives += [f"--account={args.account}"] if args.account else []
    train = shlex.join(["python3", "-m", "slimjax.cli", "train", f"--config={args.config}",
                        f"--workdir={args.workdir}", *args.overrides])
    lines = ["#!/bin/bash", *(f"#SBATCH {d}" for d in directives), "set -euo pipefail", ""]
    if args.venv:
        lines += [f"source {shlex.quote(os.path.join(args.venv, 'bin', 'activate'))}"]
    placement = ("one task per GPU: each uses the GPU of its local rank" if args.tasks == "per-gpu"
                 else "one task per node: each uses every GPU of its node")
    lines += [
        "# Process 0 runs on the first node of the allocation and hosts the jax.distributed coordinator.",
        'COORDINATOR_HOST=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)',
        f'export SLIMJAX_COORDINATOR_ADDRESS="$COORDINATOR_HOST:{args.port}"',
        "# Every task runs the same command; slimjax reads SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID",
        f"# ({placement}).",
        f"srun --kill-on-bad-exit=1 --nodes={args.nodes} --ntasks-per-node={tasks_per_node} {train}",
        "",
    ]
    return "\n".join(lines)


def parser() -> Parser:
    p = Parser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--nodes", type=int, required=True, help="nodes to allocate")
    p.add_argument("--gpus-per-node", type=int, required=True, help="GPUs on each node")
    p.add_argument("--tasks", choices=("per-node", "per-gpu"), default="per-node",
                   help="one process per node (default) or one per GPU")
    p.add_argument("--partition", default="", help="SLURM partition")
    p.add_argument("--account", default="", help="SLURM account")
    p.add_argument("--time", default="01:00:00", help="wall-clock limit ([D-]HH:MM:SS)")
    p.add_argument("--cpus-per-task", type=int, default=8, help="CPU cores per task (data loading threads)")
    p.add_argument("--job-name", default="slimjax", help="job name")
    p.add_argument("--output", default="slimjax-%j.out", help="stdout/stderr file of the job (%%j: job id)")
    p.add_argument("--port", type=int, default=29500, help="coordinator port on the first node")
    p.add_argument("--venv", default="", help="virtual environment to activate on every node")
    p.add_argument("--config", default="tiny", help="bundled config name or a path on the cluster")
    p.add_argument("--workdir", default="runs/slurm", help="run directory (on a filesystem every node shares)")
    p.add_argument("--script", default="", help="where to write the sbatch script (default: <job-name>.sbatch)")
    p.add_argument("--dry-run", action="store_true", help="print the script and the sbatch command only")
    return p


def check(args) -> None:
    if args.nodes < 1 or args.cpus_per_task < 1:
        fail(PROG, f"--nodes={args.nodes} and --cpus-per-task={args.cpus_per_task} must be >= 1")
    if args.gpus_per_node < 1:
        fail(PROG, f"--gpus-per-node={args.gpus_per_node} must be >= 1")
    if not 0 < args.port < 65536:
        fail(PROG, f"--port={args.port} must lie in 1..65535")
    if not TIME.fullmatch(args.time):
        fail(PROG, f"--time={args.time!r} must look like HH:MM:SS or D-HH:MM:SS")
    if not WORD.fullmatch(args.job_name):
        fail(PROG, f"--job-name={args.job_name!r} may use letters, digits, '_', '.' and '-' only")
    bad = [o for o in args.overrides if not o.startswith("--config.")]
    if bad:
        fail(PROG, f"only --config.KEY=VALUE overrides may follow '--', got {bad[0]!r}")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    cut = argv.index("--") if "--" in argv else len(argv)
    args = parser().parse_args(argv[:cut])
    args.overrides = argv[cut + 1:]
    check(args)
    script = sbatch_script(args)
    path = args.script or f"{args.job_name}.sbatch"
    if args.dry_run:
        print(script)
        return run_commands(PROG, [["sbatch", path]], dry_run=True)
    if shutil.which("sbatch") is None:  # before writing anything
        fail(PROG, "'sbatch' is not on PATH; run this on the cluster's login node, or pass --dry-run")
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(script)
    except OSError as e:
        fail(PROG, f"cannot write --script {path!r}: {e.strerror}")
    return run_commands(PROG, [["sbatch", path]], dry_run=False)


if __name__ == "__main__":
    sys.exit(main())
