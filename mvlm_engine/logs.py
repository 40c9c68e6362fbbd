"""Logging for every script: the standard `logging` module, one line per message on stdout as
"[tag] message" (tag = the last part of the logger name, e.g. mvlm.train -> [train]), printed
through tqdm so progress bars stay intact, and only by rank 0 under torchrun."""
from __future__ import annotations

import logging
import os
import sys


class RankZeroFilter(logging.Filter):
    """Drop INFO and below on ranks other than 0 (warnings and errors of every rank get through)."""

    def __init__(self, rank: int):
        super().__init__()
        self.rank = rank

    def filter(self, record: logging.LogRecord) -> bool:
        record.tag = record.name.rsplit(".", 1)[-1]
        return self.rank == 0 or record.levelno >= logging.WARNING


class TqdmHandler(logging.Handler):
    """Write to the current sys.stdout through tqdm.write, so a running progress bar is redrawn
    below the message (and test capture, which swaps sys.stdout, sees it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm
            tqdm.write(self.format(record), file=sys.stdout)
            sys.stdout.flush()
        except Exception:  # noqa: BLE001  (logging must never raise into the caller)
            self.handleError(record)


def setup_logging(rank: int | None = None) -> None:
    """Configure the "mvlm" loggers once per process (again after a rank is known)."""
    rank = int(os.environ.get("RANK", 0)) if rank is None else rank
    root = logging.getLogger("mvlm")
    for handler in list(root.handlers):
        root.removeHandler(handler)
    handler = TqdmHandler()
    handler.addFilter(RankZeroFilter(rank))
    handler.setFormatter(logging.Formatter("[%(tag)s] %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    root.propagate = False


def get_logger(tag: str) -> logging.Logger:
    """The logger whose lines start with "[tag]"; logging is set up on first use."""
    if not logging.getLogger("mvlm").handlers:
        setup_logging()
    return logging.getLogger(f"mvlm.{tag}")
