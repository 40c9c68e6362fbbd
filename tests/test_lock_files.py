"""Lock files leave a folder with their lock: a finished model folder holds no `.lock` for an upload
to carry, and the removal never lets two processes hold one folder (mvlm_engine/locks.py)."""
import json
import os
import subprocess
import sys

import pytest

from mvlm_engine.errors import UserError
from mvlm_engine.locks import LOCK_NAME, FileLock, at_path, folder_holder, lock_folder


def test_a_released_folder_lock_leaves_no_file(tmp_path):
    lock = lock_folder(tmp_path / "model", "a trainer")
    assert json.loads((tmp_path / "model" / LOCK_NAME).read_text())["pid"] == os.getpid()
    lock.release()
    assert list((tmp_path / "model").iterdir()) == [] and folder_holder(tmp_path / "model") is None
    lock_folder(tmp_path / "model", "the next stage").release()  # the next holder creates it afresh
    assert list((tmp_path / "model").iterdir()) == []


def test_a_process_that_opened_the_removed_file_locks_the_new_one(tmp_path):
    """The race the removal opens: B opens the lock file, A releases (unlinking it), B's flock then
    succeeds on the unlinked file. B must notice and lock the file at the path instead, so that it
    and a third process C can never both believe they hold the folder."""
    path = tmp_path / LOCK_NAME
    first = FileLock(path, "A")
    assert first.try_acquire() is None
    stale = os.open(path, os.O_RDWR)  # B's open, before A lets go
    first.release()
    assert not path.exists()
    second = FileLock(path, "B")
    real_open, opened = second._open, [stale]
    second._open = lambda: opened.pop() if opened else real_open()
    assert second.try_acquire() is None
    assert second.fd != stale and at_path(second.fd, path)
    assert folder_holder(tmp_path)["purpose"] == "B"  # C is refused: B holds the file at the path
    with pytest.raises(UserError, match=r"in use by B \(PID"):
        lock_folder(tmp_path, "C")
    second.release()
    assert not path.exists()


def test_a_lock_held_by_a_live_process_is_never_removed(tmp_path):
    code = ("import sys, time; from mvlm_engine.locks import lock_folder; "
            "lock = lock_folder(sys.argv[1], 'a live trainer'); print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match=rf"in use by a live trainer \(PID {child.pid}"):
            lock_folder(tmp_path, "validation")
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == child.pid
    finally:
        child.kill()
        child.wait()
    lock = lock_folder(tmp_path, "validation")  # kill -9 leaves the file: it is taken over, then removed
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()


def test_a_forked_child_releasing_an_inherited_lock_removes_nothing(tmp_path):
    lock = lock_folder(tmp_path, "the parent")
    pid = os.fork()
    if pid == 0:  # the child: its release must neither unlock nor remove the parent's file
        lock.release()
        os._exit(0)
    os.waitpid(pid, 0)
    assert (tmp_path / LOCK_NAME).is_file() and folder_holder(tmp_path)["purpose"] == "the parent"
    lock.release()
    assert not (tmp_path / LOCK_NAME).exists()
