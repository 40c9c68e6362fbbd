"""One-line errors for bad input: the CLI prints them and exits non-zero, no traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager


class UserError(Exception):
    """A problem with the user's input (paths, flags, data), with the fix in the message."""


def fail(errors: list[str]) -> None:
    """Raise one UserError listing every collected argument problem."""
    if errors:
        raise UserError("; ".join(errors))


@contextmanager
def user_errors_exit(prog: str):
    """Turn a UserError into 'prog: error: ...' on stderr and exit status 2."""
    try:
        yield
    except UserError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
