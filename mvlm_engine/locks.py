"""One writer per folder: an exclusive `fcntl.flock` on a lock file that records its holder.

A trainer holds `<output_dir>/.lock` for its whole run, a cache build holds
`<cache>/<kind>/<key>.lock` while it builds, and validate_models.py holds each model folder's
lock while it reads it. The kernel drops a flock when its process dies, even by kill -9, so a
lock file left by a dead process is simply taken over (its record says whose it was). The
record (PID, host, purpose, start time) is what a second process names in its one-line refusal.
Every exit that runs Python's exit (a normal end, an error, a stop) releases the locks still
held (`release_held_locks`), so a takeover is logged only after a crash or a kill -9.

A released lock's file is removed, so that a finished model folder holds no `.lock` for an upload
to carry. Safely: the holder unlinks the file while it still holds the flock, and whoever takes a
flock checks that its file is still the one at the path (same inode) and starts over if not; so a
process that opened the old file before the removal never holds a lock beside the new file's
holder. Where the file cannot be removed (a read-only folder) its record is emptied instead.
flock needs a local filesystem or NFSv4; on others, two writers are not prevented.
"""
from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import json
import os
import sys
import time
from pathlib import Path

from .errors import StorageError, UserError
from .fileio import HOST, pid_alive, storage_errors, storage_message
from .logs import get_logger
from .stopping import STOP

LOCK_NAME = ".lock"
log = get_logger("lock")
HELD_LOCKS: set["FileLock"] = set()  # the locks this process holds now, released at its exit


class FileLock:
    """An exclusive, non-blocking flock on `path`; `holder` is the record of whoever has it."""

    def __init__(self, path: Path, purpose: str):
        self.path, self.purpose = Path(path), purpose
        self.fd: int | None = None
        self.owner = 0  # the PID that took the lock (a forked child inherits the fd, not the lock's ownership)
        self.previous: dict = {}  # the record found when the lock was taken (a dead holder's)

    def try_acquire(self) -> dict | None:
        """None when the lock is now ours; else the holder's record ({} if it has written none yet)."""
        while True:
            fd = self._open()
            if fd is None:
                return None  # nobody can have written a lock file here, so nobody writes here
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = read_record(fd)
                os.close(fd)
                return holder
            if at_path(fd, self.path):
                break
            os.close(fd)  # its holder removed this file as it released it: lock the file now at the path
        self.fd, self.owner, self.previous = fd, os.getpid(), read_record(fd)
        HELD_LOCKS.add(self)
        record = {"pid": os.getpid(), "host": HOST, "purpose": self.purpose, "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": " ".join(sys.argv)[:300]}
        with contextlib.suppress(OSError):  # a read-only lock file still locks; it just keeps its old record
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(record).encode(), 0)
        return None

    def _open(self) -> int | None:
        try:
            return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            if err.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise StorageError(storage_message(err, self.path, "creating the lock file")) from None
        try:  # a read-only folder: lock its existing lock file read-only, if there is one
            return os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except OSError as err:
            raise StorageError(storage_message(err, self.path, "opening the lock file")) from None

    def release(self) -> None:
        """Remove the lock file (or empty its record), then drop the flock."""
        if self.fd is not None:
            if self.owner == os.getpid():  # a forked child's unlock would drop its parent's lock (one open file)
                self._remove_file()
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None
        HELD_LOCKS.discard(self)

    def _remove_file(self) -> None:
        """Unlink the file while the flock is still ours (see the module docstring); where it cannot
        be removed, an empty record says: released, not abandoned."""
        try:
            if at_path(self.fd, self.path):
                os.unlink(self.path)
                return
        except OSError:
            pass
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def release_held_locks() -> None:
    """Release every lock this process still holds. Why at exit: the kernel drops a flock when
    the process ends, but the record would stay and make the next holder log a takeover from a
    process that in fact ended cleanly; only a kill -9 or a crash should leave one."""
    for lock in list(HELD_LOCKS):
        if lock.owner == os.getpid():
            lock.release()


atexit.register(release_held_locks)


def at_path(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is the file now at `path` (not one removed from it)."""
    try:
        found, opened = os.stat(path), os.fstat(fd)
    except OSError:
        return False
    return (found.st_dev, found.st_ino) == (opened.st_dev, opened.st_ino)


def read_record(fd: int) -> dict:
    for attempt in range(5):  # the holder writes its record right after taking the lock
        try:
            record = json.loads(os.pread(fd, 4096, 0).decode() or "{}")
            if isinstance(record, dict) and (record or attempt == 4):
                return record
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def describe_holder(holder: dict) -> str:
    pid = holder.get("pid", "unknown")
    where = f" on {holder['host']}" if holder.get("host") not in (None, HOST) else ""
    since = f", since {holder['since']}" if holder.get("since") else ""
    return f"{holder.get('purpose', 'another process')} (PID {pid}{where}{since})"


def in_use_message(folder: Path, holder: dict) -> str:
    pid = holder.get("pid", "PID")
    return (f"{folder} is in use by {describe_holder(holder)}; wait for it to end (tail --pid={pid} -f /dev/null) or "
            f"stop it (kill {pid}; a trainer saves a checkpoint first), then run this again")


def lock_folder(folder: Path, purpose: str) -> FileLock:
    """Take `folder`'s lock (creating the folder) or refuse in one line naming the holder."""
    folder = Path(folder)
    with storage_errors(folder, "creating"):
        folder.mkdir(parents=True, exist_ok=True)
    lock = FileLock(folder / LOCK_NAME, purpose)
    holder = lock.try_acquire()
    if holder is not None:
        raise UserError(in_use_message(folder, holder))
    note_takeover(lock)
    return lock


def note_takeover(lock: FileLock) -> None:
    pid = lock.previous.get("pid")
    if isinstance(pid, int) and pid != os.getpid() and lock.previous.get("host") == HOST and not pid_alive(pid):
        log.info(f"took over {lock.path} from {describe_holder(lock.previous)}, which is no longer running")


def wait_for_lock(path: Path, purpose: str, poll: float = 0.2) -> FileLock:
    """Take the lock at `path`, waiting while another process holds it; a stop request ends the wait."""
    lock = FileLock(path, purpose)
    announced = False
    while (holder := lock.try_acquire()) is not None:
        if not announced:
            log.info(f"waiting for {describe_holder(holder)} to finish ({path})")
            announced = True
        STOP.check(f"waiting for {describe_holder(holder)}")
        time.sleep(poll)
    note_takeover(lock)
    return lock


def remove_dead_locks(folder: Path) -> list[Path]:
    """Remove the lock files in `folder` (its .lock, a cache's <key>.lock) that nobody holds: those a
    kill -9 left where no later process took the same lock again (a cache built before the kill is
    reused without its lock). Each is taken and released as any holder would, so a process that
    takes it meanwhile is never disturbed; a held one is left alone."""
    removed = []
    entries = sorted(Path(folder).iterdir()) if Path(folder).is_dir() else []
    for path in (p for p in entries if p.name.endswith(".lock") and p.is_file() and not p.is_symlink()):
        lock = FileLock(path, "removing a lock nobody holds")
        if lock.try_acquire() is None and lock.fd is not None:
            lock.release()
            removed.append(path)
    return removed


def folder_holder(folder: Path) -> dict | None:
    """The record of whoever holds `folder`'s lock now, or None when nobody does (taking nothing)."""
    path = Path(folder) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as err:
        if err.errno in (errno.ENOENT, errno.ENOTDIR):
            return None
        raise
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return read_record(fd)
    finally:
        os.close(fd)  # closing drops a lock we got
    return None
