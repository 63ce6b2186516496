"""The errors the CLI turns into a one-line message and an exit code instead of a traceback."""


def first_line(message: object) -> str:
    """The first non-blank line of an exception's text or a tool's output, for one-line errors ("" when there
    is none; an exception without text gives its type name)."""
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    if lines:
        return lines[0]
    return type(message).__name__ if isinstance(message, BaseException) else ""


class UserError(Exception):
    """Bad input from the user: a config value, a file, a model pair. The message is one line. Exit code 2."""


class Interrupted(Exception):
    """A phase stopped on SIGINT/SIGTERM after writing a checkpoint; `--resume` continues it. Exit code 128 + signal."""

    def __init__(self, message: str, signum: int):
        super().__init__(message)
        self.signum = signum


class RunFailed(Exception):
    """A run that could not finish (workers kept dying, a labeler stalled). The message is one line. Exit code 1."""
