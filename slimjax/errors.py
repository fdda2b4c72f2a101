"""The one exception type for mistakes a user can make (bad config, data, files, mesh).

The CLI prints its message on one line and exits with status 2; library callers (notebooks,
scripts) can catch it. Messages name the key, file or value at fault and say what to do.
"""


class SlimjaxError(Exception):
    """A problem the user caused and can fix; the message says what and how."""


def one_line(message: str) -> str:
    """Collapses a message onto one line (the CLI promise) without losing its words."""
    return " ".join(str(message).split())
