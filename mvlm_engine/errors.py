"""The exceptions a run ends with; cli.run_cli turns each into one line and an exit status."""
from __future__ import annotations


class UserError(Exception):
    """A problem with the user's input (paths, flags, data), with the fix in the message. Exit 2."""


class TrainingDiverged(Exception):
    """The loss or the weights stayed non-finite; the message names the last good checkpoint. Exit 1."""


class StorageError(Exception):
    """A file could not be written or read (full disk, read-only, permissions); the message names
    the path and the cause. Exit 1."""


class OutOfMemory(Exception):
    """A training step or evaluation ran out of memory; the message names the micro-batch, the flags
    to lower it while keeping the tokens per step, and the last good checkpoint. Exit 1."""


class TrainingInterrupted(Exception):
    """SIGINT/SIGTERM arrived; a checkpoint was saved if there was training state to save. Carries
    the exit status to use (128 + signal)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


class SignalStop(KeyboardInterrupt):
    """SIGINT/SIGTERM where there is nothing to save: raised at once by the signal handler (a
    KeyboardInterrupt, so that no `except Exception` swallows it). Exit 128 + signal."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


def fail(errors: list[str]) -> None:
    """Raise one UserError listing every collected argument problem."""
    if errors:
        raise UserError("; ".join(errors))
