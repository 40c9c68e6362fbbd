"""A finished model folder as a download, whatever the model: its manifest, a reproducible
archive, and the checksums beside the archives.

At the end of training every model directory gets `model_manifest.json`: sha256 and size of each
top-level file. `package_model` turns the final model (not checkpoints/ or tensorboard/) into a
reproducible .tar.gz; `SHA256SUMS` lists every download. The check functions return problems as
messages that name the file, for validate_models.py. What the downloads say to users (DOWNLOAD.md,
model cards, the other clients' formats) is the release's business: the top-level `release/` package.
"""
from __future__ import annotations

import gzip
import json
import os
import tarfile
from pathlib import Path

from .fileio import atomic_write_text, ensure_free_space, remove_dead_staging, sha256_file, staging_path, storage_errors

MODEL_MANIFEST = "model_manifest.json"
RUN_SUMMARY = "run_summary.json"  # what a finished training run records (trainer.finish writes it)
NOT_PACKAGED = {"checkpoints", "tensorboard"}
SUMS_NAME = "SHA256SUMS"
COMPRESS_LEVEL = 0


def model_files(model_dir: Path) -> list[Path]:
    """The final model's files: every top-level file except the manifest itself, hidden files
    (the folder's .lock) and staging files."""
    return sorted(p for p in model_dir.iterdir() if p.is_file() and p.name != MODEL_MANIFEST
                  and not p.name.startswith(".") and not p.name.endswith(".tmp"))


def write_model_manifest(model_dir: Path) -> dict:
    manifest = {"files": {p.name: {"sha256": sha256_file(p), "bytes": p.stat().st_size}
                          for p in model_files(model_dir)}}
    atomic_write_text(model_dir / MODEL_MANIFEST, json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    return manifest


def check_model_manifest(model_dir: Path, required: tuple[str, ...]) -> list[str]:
    """Missing required files, and files whose size or sha256 differs from the manifest."""
    problems = [f"{model_dir / name}: missing" for name in required if not (model_dir / name).is_file()]
    manifest_path = model_dir / MODEL_MANIFEST
    if not manifest_path.is_file():
        return problems + [f"{manifest_path}: missing (written at the end of training)"]
    try:
        recorded = json.loads(manifest_path.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return problems + [f"{manifest_path}: corrupt"]
    for name, entry in sorted(recorded.items()):
        path = model_dir / name
        if not path.is_file():
            if name not in required:
                problems.append(f"{path}: missing")
        elif path.stat().st_size != entry["bytes"]:
            problems.append(f"{path}: size {path.stat().st_size} bytes, manifest says {entry['bytes']}")
        elif sha256_file(path) != entry["sha256"]:
            problems.append(f"{path}: sha256 differs from the manifest")
    return problems


def package_model(model_dir: Path, archive: Path) -> Path:
    """A reproducible .tar.gz of the final model (same files, same bytes, same archive)."""
    with storage_errors(archive.parent, "creating"):
        archive.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_staging(archive.parent)
    members = [p for p in sorted(model_dir.iterdir()) if p.is_file() and p.name not in NOT_PACKAGED
               and not p.name.startswith(".") and not p.name.endswith(".tmp")]
    size = sum(p.stat().st_size for p in members)
    needed = size + size // 1000 + 2048 * (len(members) + 2)  # stored: tar headers and gzip block overhead
    ensure_free_space(archive.parent, needed, f"the archive {archive.name}")
    tmp = staging_path(archive)
    try:
        with storage_errors(archive, "writing", needed):
            # Level 0 (stored blocks): gzip -9 shrinks fp32/bf16 weights by ~7% at ~10 MB/s (RESULTS.md), minutes
            # of a rented GPU box for a 1 GB model; stored blocks keep the .tar.gz every client opens, at disk speed.
            with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="",
                                                       compresslevel=COMPRESS_LEVEL) as zipped, \
                    tarfile.open(fileobj=zipped, mode="w", format=tarfile.PAX_FORMAT) as tar:
                for path in members:
                    info = tar.gettarinfo(str(path), arcname=f"{model_dir.name}/{path.name}")
                    info.mtime, info.uid, info.gid, info.uname, info.gname, info.mode = 0, 0, 0, "", "", 0o644
                    with open(path, "rb") as handle:
                        tar.addfile(info, handle)
            os.replace(tmp, archive)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return archive


def write_sha256sums(folder: Path, files: list[Path]) -> Path:
    lines = "".join(f"{sha256_file(a)}  {a.name}\n" for a in sorted(files))
    atomic_write_text(folder / SUMS_NAME, lines)
    return folder / SUMS_NAME


def check_sha256sums(folder: Path) -> list[str]:
    """Every file listed in SHA256SUMS exists and matches its sum; each archive is a readable tar.gz."""
    sums = folder / SUMS_NAME
    if not sums.is_file():
        return [f"{sums}: missing"]
    problems = []
    for line in sums.read_text().splitlines():
        expected, _, name = line.partition("  ")
        path = folder / name
        if not path.is_file():
            problems.append(f"{path}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{path}: sha256 differs from {sums.name}")
        elif name.endswith(".tar.gz"):
            try:
                with tarfile.open(path, "r:gz") as tar:
                    tar.getmembers()
            except (tarfile.TarError, OSError, EOFError) as err:
                problems.append(f"{path}: not a readable .tar.gz ({err})")
    return problems


def archive_listing(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:gz") as tar:
        return [m.name for m in tar.getmembers()]


def finished_models(models_dir: Path) -> list[str]:
    """Folders of `models_dir` that hold a finished model (a model manifest)."""
    return sorted(p.name for p in models_dir.iterdir() if (p / MODEL_MANIFEST).is_file()) if models_dir.is_dir() else []
