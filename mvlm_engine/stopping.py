"""SIGINT and SIGTERM: a prompt stop that never costs a checkpoint and never prints a traceback.

`cli.run_cli` installs the handler for every script. Outside `STOP.deferred()` a signal stops
at once (SignalStop): nothing is half-written then, since every write is atomic and staging
files of dead processes are removed at the next start. A trainer runs its work inside
`STOP.deferred()`: the first signal only records the request, and the work checks it at its
safe points (between training steps, evaluation batches, encoding batches, while waiting for a
lock or for the tokenizer-training process) and stops there, with a checkpoint when there is
training state to save. Later signals are noted and change nothing: the checkpoint of the
current step is still written, and once a stop is on its way out (its exception leaving the
deferred region, or a SignalStop raised) further signals are only noted until the process ends,
and ignored during the interpreter's own exit (see `ignore_repeats_at_exit`).
"""
from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading

from .errors import SignalStop, TrainingInterrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    """The process-wide stop request (one per process: signals are per process)."""

    def __init__(self):
        self.signum = 0
        self.depth = 0  # nesting of deferred() regions
        self.stopping = False  # a stop is on its way out: later signals are only noted
        self._previous: dict | None = None

    @property
    def requested(self) -> bool:
        return self.signum > 0

    @property
    def exit_code(self) -> int:
        return 128 + (self.signum or signal.SIGTERM)

    @property
    def name(self) -> str:
        return signal.Signals(self.signum or signal.SIGTERM).name

    def _handle(self, signum, _frame):
        if self.depth == 0 and not self.stopping:
            self.signum, self.stopping = signum, True
            raise SignalStop(f"stopped by {self.name}", 128 + signum)
        if self.stopping and not self.depth:
            os.write(1, f"[stop] {signal.Signals(signum).name} again: already stopping\n".encode())
            return
        if self.signum:
            os.write(1, f"[stop] {signal.Signals(signum).name} again: still stopping at the next safe point; "
                        "the checkpoint is not given up\n".encode())
            return
        self.signum = signum
        os.write(1, f"[stop] {self.name} received: stopping at the next safe point\n".encode())

    def install(self) -> bool:
        """Install the handler (main thread only) for new work; False if it was already installed."""
        self.stopping = False
        if self._previous is not None or threading.current_thread() is not threading.main_thread():
            return False
        self._previous = {sig: signal.signal(sig, self._handle) for sig in SIGNALS}
        return True

    def uninstall(self) -> None:
        if self._previous is not None:
            for sig, handler in self._previous.items():
                signal.signal(sig, handler)
            self._previous = None
        self.stopping = False

    @contextlib.contextmanager
    def deferred(self):
        """Inside: a signal is a request, honoured at the next check()."""
        installed = self.install()
        if self.depth == 0:
            self.signum = 0
        self.depth += 1
        try:
            yield self
        except BaseException:
            self.stopping = self.stopping or (self.depth == 1 and self.signum > 0)  # a stop leaving the region
            raise
        finally:
            self.depth -= 1
            if self.depth == 0:
                self.signum = 0  # handled (the exception on its way out carries the exit status)
            if installed:
                self.uninstall()

    def check(self, doing: str, saved: str = "nothing was saved, none was needed") -> None:
        """Stop here if a signal arrived: one line saying what was stopped and what was saved."""
        if self.signum and self.depth:
            raise TrainingInterrupted(f"stopped by {self.name} while {doing}; {saved}", self.exit_code)


STOP = StopRequest()


def ignore_repeats_at_exit() -> None:
    """At interpreter exit after an honoured stop: ignore SIGINT/SIGTERM from here on.

    Why: Python restores the default handlers after the atexit hooks, before tearing the modules
    down (long with torch loaded), and a repeat landing then would kill the process by the signal
    (-15) instead of letting it exit with the stop's status. An ignored signal stays ignored
    there. In process (tests), run_cli's handler is kept and uninstalled by the caller, which
    clears `stopping`, so this changes nothing for them."""
    if STOP.stopping and threading.current_thread() is threading.main_thread():
        for sig in SIGNALS:
            signal.signal(sig, signal.SIG_IGN)


atexit.register(ignore_repeats_at_exit)
