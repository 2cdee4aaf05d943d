"""What can stop a run, as exceptions whose message is one line for the user.

Example:
    >>> str(RunError("unknown model 'lenet'"))
    "unknown model 'lenet'"
"""


class RunError(Exception):
    """Bad input found before training: a name, a flag, the run folder, a checkpoint or a
    missing dataset. The message is one line that says what is wrong and what to do."""


class Interrupted(Exception):
    """Training was interrupted (Ctrl-C or SIGTERM); the message says how to resume."""


class NonFiniteLoss(Exception):
    """The training loss became NaN or infinite; the message names the epoch and step."""
