"""What the Cloud TPU and SLURM launchers share: one-line argument errors, print-or-run of commands.

The launchers run on a workstation that need not have JAX (or slimjax) installed, so this module
uses the standard library only.
"""

from __future__ import annotations

import argparse
import shlex
import shutil
import subprocess
import sys
from typing import NoReturn, Sequence


def fail(prog: str, message: str) -> NoReturn:
    """The project's error contract: one line on stderr, exit status 2."""
    print(f"{prog}: error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(2)


class Parser(argparse.ArgumentParser):
    """argparse with errors on one line (no usage dump), exit status 2."""

    def error(self, message: str) -> NoReturn:
        fail(self.prog.split()[0], f"{message} (see --help)")


def run_commands(prog: str, commands: Sequence[Sequence[str]], dry_run: bool) -> int:
    """Prints each command (shell-quoted) with ``dry_run``; otherwise runs them in order, stopping at
    the first failure with that command's exit status."""
    for cmd in commands:
        line = shlex.join(cmd)
        if dry_run:
            print(line)
            continue
        if shutil.which(cmd[0]) is None:
            fail(prog, f"'{cmd[0]}' is not on PATH; install it, or pass --dry-run to print the commands")
        print(f"+ {line}", flush=True)
        status = subprocess.run(list(cmd)).returncode
        if status:
            print(f"{prog}: error: command failed with status {status}: {line}", file=sys.stderr)
            return status
    return 0
