"""Errors that are the user's to fix (an option, a folder, a file), told in one line.

``train.py`` catches :class:`UserError` at the top, prints its message as one line and exits with
status 2 (the status argparse and jsonargparse use for a bad command line); ``TOWERS_DEBUG=1``
shows the traceback instead. Subclasses keep the built-in type code already catches
(``ValueError``, ``FileNotFoundError``), so library callers see what they saw before.
"""


class UserError(Exception):
    """A mistake in the options or the files given; the message says what and how to fix it."""


class BadOption(UserError, ValueError):
    """An option value that cannot work (an impossible model, splits larger than the data, ...)."""


class MissingData(UserError, FileNotFoundError):
    """A data folder or file that is not there, or holds no usable images."""


class NotWritable(UserError, PermissionError):
    """A folder the run must write to (the data root, ``cache_dir``) that it may not write to."""


class DamagedCheckpoint(UserError, ValueError):
    """A checkpoint file that cannot be read: truncated, or not a checkpoint at all."""


class Diverged(RuntimeError):
    """The training loss or the weights became NaN or infinite; train.py exits with status 3."""


class Interrupted(Exception):
    """The run was stopped by a signal (SIGUSR1 outside SLURM) after saving a resumable checkpoint;
    train.py exits with ``128 + signum`` (the status a shell gives a process the signal ended)."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message or f"stopped by signal {signum}")
        self.signum = signum
