"""Model manifests, download archives and their checksums.

At the end of training every model directory gets `model_manifest.json`: sha256 and size of
each top-level file. `package_model` turns the final model (not checkpoints/ or tensorboard/)
into a reproducible .tar.gz; `SHA256SUMS` and DOWNLOAD.md sit beside the archives. The check
functions return problems as messages that name the file, for validate_models.py.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import tarfile
from pathlib import Path

from .errors import UserError
from .fileio import (atomic_write_text, ensure_free_space, folder_problem, remove_dead_staging, sha256_file,
                     staging_path, storage_errors)
from .logs import get_logger

log = get_logger("package")

MODEL_MANIFEST = "model_manifest.json"
NOT_PACKAGED = {"checkpoints", "tensorboard"}
SUMS_NAME = "SHA256SUMS"


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
    needed = sum(p.stat().st_size for p in members)  # at most; gzip makes it smaller
    ensure_free_space(archive.parent, needed, f"the archive {archive.name}")
    tmp = staging_path(archive)
    try:
        with storage_errors(archive, "writing", needed):
            with open(tmp, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0, filename="") as zipped, \
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


def write_sha256sums(folder: Path, archives: list[Path]) -> Path:
    lines = "".join(f"{sha256_file(a)}  {a.name}\n" for a in sorted(archives))
    atomic_write_text(folder / SUMS_NAME, lines)
    return folder / SUMS_NAME


def check_sha256sums(folder: Path) -> list[str]:
    """Every archive listed in SHA256SUMS exists, is a readable tar.gz and matches its sum."""
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
        else:
            try:
                with tarfile.open(path, "r:gz") as tar:
                    tar.getmembers()
            except (tarfile.TarError, OSError, EOFError) as err:
                problems.append(f"{path}: not a readable .tar.gz ({err})")
    return problems


def archive_listing(archive: Path) -> list[str]:
    with tarfile.open(archive, "r:gz") as tar:
        return [m.name for m in tar.getmembers()]


def write_download_md(folder: Path, models: dict[str, dict]) -> Path:
    """DOWNLOAD.md: how to verify and load each packaged model. models: name -> info."""
    out = io.StringIO()
    out.write("# Model downloads\n\nVerify the archives, unpack, and load with transformers:\n\n"
              "```bash\nsha256sum -c SHA256SUMS\n")
    for name in models:
        out.write(f"tar -xzf {name}.tar.gz\n")
    out.write("```\n")
    for name, info in models.items():
        remote = ", trust_remote_code=True" if info.get("trust_remote_code") else ""
        out.write(f"\n## {name}\n\n{info.get('description', '')}\n\n"
                  f"- archive: `{name}.tar.gz` ({info['archive_bytes']:,} bytes)\n"
                  f"- files: {', '.join(info['files'])}\n\n"
                  "```python\nfrom transformers import AutoModelForCausalLM, AutoTokenizer\n"
                  f'model = AutoModelForCausalLM.from_pretrained("{name}"{remote})\n'
                  f'tokenizer = AutoTokenizer.from_pretrained("{name}"{remote})\n'
                  'ids = tokenizer("[KJV] John 3:16", return_tensors="pt").input_ids\n'
                  "print(tokenizer.decode(model.generate(ids, max_new_tokens=40, do_sample=True, top_p=0.9)[0]))\n"
                  "```\n")
    atomic_write_text(folder / "DOWNLOAD.md", out.getvalue())
    return folder / "DOWNLOAD.md"


def describe_model(model_dir: Path) -> dict:
    """What DOWNLOAD.md says of a model: its description (recorded in run_summary.json at the
    end of training) and whether transformers needs trust_remote_code (config.json has auto_map)."""
    def read(name):
        try:
            return json.loads((model_dir / name).read_text())
        except (OSError, json.JSONDecodeError):
            return {}
    summary, config = read("run_summary.json"), read("config.json")
    return {"description": summary.get("description") or summary.get("model", model_dir.name),
            "trust_remote_code": isinstance(config, dict) and "auto_map" in config}


def finished_models(models_dir: Path) -> list[str]:
    """Folders of `models_dir` that hold a finished model (a model manifest)."""
    return sorted(p.name for p in models_dir.iterdir() if (p / MODEL_MANIFEST).is_file()) if models_dir.is_dir() else []


def package_all(models_dir: Path, download_dir: Path, names: list[str] | None = None) -> list[Path]:
    """Archive every trained model in `models_dir`, then write SHA256SUMS and DOWNLOAD.md."""
    names = names or finished_models(models_dir)
    archives, info = [], {}
    for name in names:
        archive = package_model(models_dir / name, download_dir / f"{name}.tar.gz")
        archives.append(archive)
        info[name] = {**describe_model(models_dir / name), "archive_bytes": archive.stat().st_size,
                      "files": [m.split("/", 1)[1] for m in archive_listing(archive)]}
    existing = [p for p in download_dir.glob("*.tar.gz") if p not in archives]
    write_sha256sums(download_dir, archives + existing)
    write_download_md(download_dir, info)
    return archives


def main(argv=None) -> None:
    """python -m mvlm_engine.packaging: archive finished models, write SHA256SUMS and DOWNLOAD.md."""
    from .cli import OneLineParser
    from .locks import folder_holder, in_use_message

    parser = OneLineParser(prog="packaging", description="Archive trained models with SHA256SUMS and DOWNLOAD.md")
    parser.add_argument("--models_dir", type=Path, default=Path("models"))
    parser.add_argument("--download_dir", type=Path, default=Path("models_for_download"))
    parser.add_argument("--names", nargs="*", help="model folders (default: every folder of --models_dir that holds "
                                                   "a finished model)")
    args = parser.parse_args(argv)
    if not args.models_dir.is_dir():
        raise UserError(f"--models_dir {args.models_dir} is not a folder; train the models first")
    missing = [n for n in args.names or [] if not (args.models_dir / n / MODEL_MANIFEST).is_file()
               or Path(n).name != n]
    if missing:
        raise UserError(f"no finished model (with {MODEL_MANIFEST}) in "
                        f"{', '.join(str(args.models_dir / n) for n in missing)}")
    if not (args.names or finished_models(args.models_dir)):
        raise UserError(f"no finished model (with {MODEL_MANIFEST}) in {args.models_dir}; train the models first")
    problem = folder_problem(args.download_dir, "--download_dir")
    if problem:
        raise UserError(problem)
    for name in args.names or finished_models(args.models_dir):
        holder = folder_holder(args.models_dir / name)
        if holder is not None:
            raise UserError(in_use_message(args.models_dir / name, holder))
    for archive in package_all(args.models_dir, args.download_dir, args.names):
        log.info(f"packaged {archive} ({archive.stat().st_size:,} bytes)")
    log.info(f"wrote {args.download_dir / SUMS_NAME} and {args.download_dir / 'DOWNLOAD.md'}")


if __name__ == "__main__":
    from .cli import run_cli
    run_cli("packaging", main)
