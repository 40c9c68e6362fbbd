"""Reproducible downloads: packaging the same model folders gives the same bytes, every file of the
download folder (the .tar.gz archives, the .gguf file, SHA256SUMS, DOWNLOAD.md), on two runs and
after a kill -9 inside an archive write or a GGUF write followed by a plain rerun."""
import gzip
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time

import pytest

from conftest import REPO
from mvlm_engine.fileio import STAGING

pytestmark = pytest.mark.e2e  # it packages the shared tiny trained models


@pytest.fixture(scope="module")
def models(trained_gpt2, trained_simone, tmp_path_factory):
    root = tmp_path_factory.mktemp("reproducible") / "models"
    for trained, name in ((trained_gpt2, "mvlm_gpt2"), (trained_simone, "simone_enhanced")):
        shutil.copytree(trained, root / name, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    return root


def package_command(models, downloads):
    return [sys.executable, "-m", "release.package", "--models_dir", str(models), "--download_dir", str(downloads),
            "--formats", "gguf"]


def package(models, downloads):
    proc = subprocess.run(package_command(models, downloads), cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-2000:]


def contents(downloads) -> dict:
    return {p.name: p.read_bytes() for p in sorted(downloads.iterdir())}


@pytest.fixture(scope="module")
def first(models, tmp_path_factory):
    downloads = tmp_path_factory.mktemp("first")
    package(models, downloads)
    return contents(downloads)


def test_two_packagings_of_the_same_folders_are_byte_identical(models, first, tmp_path):
    shipped = {"mvlm_gpt2.tar.gz", "simone_enhanced.tar.gz", "mvlm_gpt2-f16.gguf", "mvlm_gpt2-q8_0.gguf", "SHA256SUMS",
               "DOWNLOAD.md"}
    assert shipped <= set(first) <= shipped | {"mvlm_gpt2-q4_k_m.gguf"}  # 4-bit where llama-cpp-python is installed
    time.sleep(1.1)  # a second later: no clock reading may reach the bytes
    os.utime(models / "mvlm_gpt2" / "config.json")  # nor a file's modification time
    package(models, tmp_path)
    assert contents(tmp_path) == first


def test_the_archives_fix_order_times_owners_modes_and_the_gzip_header(first):
    import io
    data = first["mvlm_gpt2.tar.gz"]
    assert data[4:8] == b"\0\0\0\0" and not data[3] & 0x08  # gzip header: mtime 0, no file name
    with gzip.open(io.BytesIO(data)) as raw, tarfile.open(fileobj=raw) as tar:
        members = tar.getmembers()
    assert [m.name for m in members] == sorted(m.name for m in members)
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname, m.mode) for m in members} == {(0, 0, 0, "", "", 0o644)}


def kill_inside(command, downloads, marker: str, attempts: int = 5) -> str:
    """Run `command` and SIGKILL it the moment a staging file whose name holds `marker` appears in
    `downloads`; returns that file's name (tries again when the write was over before it was seen)."""
    for _ in range(attempts):
        proc = subprocess.Popen(command, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while proc.poll() is None:
            seen = [n for n in (os.listdir(downloads) if downloads.is_dir() else []) if marker in n and STAGING.search(n)]
            if seen:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                return seen[0]
            time.sleep(0.0002)
        proc.wait()
    pytest.fail(f"no {marker} staging file was seen in {attempts} runs")


@pytest.mark.parametrize("marker", [".tar.gz.", ".gguf."])
def test_a_kill_inside_a_write_then_a_rerun_gives_the_same_bytes(models, first, marker, tmp_path):
    downloads = tmp_path / "downloads"
    left = kill_inside(package_command(models, downloads), downloads, marker)
    assert (downloads / left).exists()  # the kill landed inside the write and left its staging file
    package(models, downloads)
    assert contents(downloads) == first  # the dead writer's staging file is gone, every byte as before
