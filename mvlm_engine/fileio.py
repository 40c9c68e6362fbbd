"""Small file helpers: atomic writes, durable renames, content hashes, and storage errors.

Every write that can fail for want of space or permission goes through `storage_errors`,
which turns the failure (an OSError, or the RuntimeError torch and safetensors wrap it in)
into one StorageError line naming the path and the cause. Staging names carry the writer's
PID and host, so the staging files of a dead process can be told from a live one's.
"""
from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import socket
import tempfile
from pathlib import Path

from .errors import StorageError

MB = 1 << 20
HOST = socket.gethostname()
CAUSES = {
    errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
    errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted", errno.ENOTDIR: "a part of the path is a file, not a folder",
    errno.EISDIR: "a folder is in the way", errno.ENOENT: "no such file or folder", errno.EIO: "input/output error",
    errno.EFBIG: "file too large", errno.ENAMETOOLONG: "file name too long", errno.EEXIST: "file exists",
}
# How torch (RuntimeError) and safetensors (SafetensorError) report a failed write.
IO_FAILURE_TEXT = ("file write failed", "unexpected pos", "inline_container", "PytorchStreamWriter",
                   "os error", "No space left", "IoError", "Read-only file system", "Permission denied")
TEXT_ERRNO = {"os error 28": errno.ENOSPC, "No space left": errno.ENOSPC, "StorageFull": errno.ENOSPC,
              "os error 30": errno.EROFS, "Read-only file system": errno.EROFS, "os error 13": errno.EACCES,
              "Permission denied": errno.EACCES, "os error 20": errno.ENOTDIR, "os error 122": errno.EDQUOT}
STAGING = re.compile(r"\.(\d+)@(.+)\.tmp$")


# --------------------------------------------------------------------------- storage errors


def nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (a file or a folder)."""
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_bytes(path: Path) -> int | None:
    try:
        where = nearest_existing(path)
        return shutil.disk_usage(where if where.is_dir() else where.parent).free
    except OSError:
        return None


def error_number(err: BaseException) -> int | None:
    if isinstance(err, OSError) and err.errno:
        return err.errno
    text = str(err)
    return next((code for needle, code in TEXT_ERRNO.items() if needle in text), None)


def storage_message(err: BaseException, path: Path, action: str = "writing", needed: int | None = None) -> str:
    """One line: the cause, what was being done, the path; for a full disk, the space needed and free."""
    code = error_number(err)
    free = free_bytes(path)
    if code is None and free is not None and free < max(needed or 0, MB):
        code = errno.ENOSPC  # torch ("unexpected pos") and numpy ("requested and written") give no errno
    if isinstance(err, OSError) and err.filename:
        path = err.filename
    cause = CAUSES.get(code) or (err.strerror if isinstance(err, OSError) and err.strerror else None) or \
        f"write failed ({(str(err).splitlines() or [type(err).__name__])[0][:160]})"
    line = f"{cause} {action} {path}"
    if code in (errno.ENOSPC, errno.EDQUOT) and free is not None:
        line += (f"; about {needed / MB:,.1f} MB needed, " if needed else "; ") + f"{free / MB:,.1f} MB free"
    return line


def is_io_failure(err: BaseException) -> bool:
    return isinstance(err, OSError) or any(text in str(err) for text in IO_FAILURE_TEXT)


@contextlib.contextmanager
def storage_errors(path: Path, action: str = "writing", needed: int | None = None):
    """Turn a failed write inside the block into one StorageError line naming `path` and the cause."""
    try:
        yield
    except StorageError:
        raise
    except Exception as err:  # noqa: BLE001  (torch and safetensors wrap OSError in their own types)
        if not is_io_failure(err):
            raise
        raise StorageError(storage_message(err, path, action, needed)) from None


def ensure_free_space(folder: Path, needed: int, what: str, hint: str = "") -> None:
    """Refuse to start a write of about `needed` bytes into `folder` that cannot fit."""
    free = free_bytes(folder)
    if free is not None and free < needed:
        raise StorageError(f"no space left on device for {what} in {nearest_existing(folder)}: about "
                           f"{needed / MB:,.1f} MB needed, {free / MB:,.1f} MB free{hint}")


def folder_problem(path: Path, flag: str) -> str | None:
    """None when `path` is a folder this process can write in (or can create); else one message.
    Writes nothing but a probe file that is removed at once."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        return f"{flag} {path} is a file; choose a folder"
    where = nearest_existing(path)
    if not where.is_dir():
        return f"{flag} {path} is under {where}, which is a file, not a folder"
    try:
        handle, name = tempfile.mkstemp(prefix=".write-probe-", dir=where)
        os.close(handle)
        os.unlink(name)
    except OSError as err:
        return f"{flag} {path} cannot be written ({CAUSES.get(err.errno, err.strerror)} in {where})"
    return None


# --------------------------------------------------------------------------- staging names


def staging_path(path: Path) -> Path:
    """A sibling name for `path` that is unique to this process: .NAME.PID@HOST.tmp"""
    return path.with_name(f".{path.name}.{os.getpid()}@{HOST}.tmp")


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def remove_dead_staging(folder: Path) -> list[Path]:
    """Remove the staging files and folders in `folder` left by dead processes of this host;
    a live process's (or another host's) are never touched."""
    removed = []
    if not Path(folder).is_dir():
        return removed
    for entry in Path(folder).iterdir():
        match = STAGING.search(entry.name)
        if match and match.group(2) == HOST and not pid_alive(int(match.group(1))):
            with contextlib.suppress(OSError):
                shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
                removed.append(entry)
    return removed


# --------------------------------------------------------------------------- writes and hashes


def atomic_write_text(path: Path, text: str) -> None:
    """Write via a temporary file, fsync and rename: readers see the old or the new file, whole.
    A failure removes the temporary file and raises one StorageError line."""
    path = Path(path)
    tmp = staging_path(path)  # unique: several processes may write
    try:
        with storage_errors(path):
            with open(tmp, "w", encoding="utf-8") as handle:
                handle.write(text)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def plain_file_modes(folder: Path) -> None:
    """Let the files directly in `folder` be read as a plain open() would allow (0644 under
    umask 022): safetensors >= 0.8 writes model.safetensors through a private temporary file,
    mode 0600, which a model folder shared with others or uploaded as it is would keep."""
    mask = os.umask(0)
    os.umask(mask)
    for path in Path(folder).iterdir():
        if path.is_file() and not path.is_symlink():
            path.chmod((path.stat().st_mode & 0o777) | (0o644 & ~mask))


def fsync_dir(path: Path) -> None:
    """Make a rename inside `path` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def read_json_object(path: Path) -> dict:
    """The JSON object in `path`, or {} when it is missing, unreadable, not JSON or not an object
    (for optional records, such as a model folder's run_summary.json, that a reader may go without)."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return value if isinstance(value, dict) else {}
