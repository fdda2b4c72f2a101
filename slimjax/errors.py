"""The one exception type for mistakes a user can make (bad config, data, files, mesh).

The CLI prints its message on one line and exits with status 2; library callers (notebooks,
scripts) can catch it. Messages name the key, file or value at fault and say what to do.
"""


class SlimjaxError(Exception):
    """A problem the user caused and can fix; the message says what and how."""


def one_line(message: str) -> str:
    """Collapses a message onto one line (the CLI promise) without losing its words."""
    return " ".join(str(message).split())


class Preempted(Exception):
    """Training stopped on SIGTERM (preemption) after saving a checkpoint at ``step``.

    Not a user error: rerunning the same command resumes from that checkpoint. The CLI exits with
    ``EXIT_STATUS`` (128 + SIGTERM, the status schedulers expect from a process ended by SIGTERM).
    """

    EXIT_STATUS = 143

    def __init__(self, step: int, checkpoint_dir: str):
        super().__init__(f"preempted (SIGTERM): checkpoint saved at step {step} in {checkpoint_dir}; "
                         "rerun the same command to resume")
        self.step = step
        self.checkpoint_dir = checkpoint_dir
