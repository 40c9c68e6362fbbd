"""python -m release.package: archive the finished models, write each single-file format beside
the archive of every model it can express, then SHA256SUMS over every download and DOWNLOAD.md.

    python3 -m release.package [--models_dir models] [--download_dir models_for_download]
                               [--names NAME ...] [--formats gguf | gguf_f16 gguf_q8_0 gguf_q4_k_m]

The archives and checksums are the engine's (mvlm_engine.packaging); what a download says to users
is release/download.py's. A single-file format (`DownloadFormat`, listed in FORMATS) writes
`<name><suffix>` or says in one line why this model has none; which models a format can express is
the model registry's (model_registry.py). `--formats gguf` is every GGUF file of FORMATS.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Protocol

from mvlm_engine.cli import OneLineParser, run_cli
from mvlm_engine.errors import UserError
from mvlm_engine.fileio import folder_problem, read_json_object, storage_errors
from mvlm_engine.locks import folder_holder, in_use_message
from mvlm_engine.logs import get_logger
from mvlm_engine.packaging import (MODEL_MANIFEST, SUMS_NAME, archive_listing, finished_models, package_model,
                                   write_sha256sums)

from . import GENERATION_DEFAULTS
from .download import describe_model, gguf_usage, write_download_md

PROG = "release.package"
log = get_logger("package")


class DownloadFormat(Protocol):
    """A single-file format for clients other than transformers, written beside the archives."""

    suffix: str  # the file is `<model folder name><suffix>`
    family: str  # formats of one family share DOWNLOAD.md's usage text (the first written file's)
    label: str  # what DOWNLOAD.md says of the file's contents, e.g. "float16 weights"

    def write(self, model_dir: Path, output: Path) -> str | None:
        """Write `output` atomically (staging file then rename, free space checked first): None; or,
        writing nothing, the one-line reason this model has no such form. Raises for real faults."""

    def usage(self, output: Path, generation: dict) -> str:
        """DOWNLOAD.md markdown: how to run the written file `output` with the sampling defaults `generation`."""


class GGUFDownload:
    """`<name>-<dtype>.gguf` for llama.cpp and Ollama (release/gguf_conversion.py, export_gguf.py's --dtype)."""

    family = "gguf"

    def __init__(self, dtype: str, label: str):
        self.dtype, self.label, self.suffix = dtype, label, f"-{dtype}.gguf"

    def write(self, model_dir: Path, output: Path) -> str | None:
        """None when written, else the one-line reason this model has no GGUF form (nothing written).
        A folder that is broken, not merely inexpressible, is a UserError; a full disk a StorageError."""
        from .gguf_conversion import CannotExpress, export

        try:
            export(model_dir, output, self.dtype)
        except CannotExpress as err:
            return str(err)
        return None

    def usage(self, output: Path, generation: dict) -> str:
        return gguf_usage(output, generation)


# What the pipeline ships: float16 (llama.cpp's usual unquantized file), 8-bit, and 4-bit where
# llama-cpp-python (llama.cpp's own quantizer) is installed. No float32 file: twice the float16 size
# for no difference llama.cpp users see (the tests measure it); the archive keeps the exact float32
# weights, and export_gguf.py --dtype f32 makes that file from them.
FORMATS: dict[str, DownloadFormat] = {
    "gguf_f16": GGUFDownload("f16", "float16 weights"),
    "gguf_q8_0": GGUFDownload("q8_0", "8-bit weights (Q8_0)"),
    "gguf_q4_k_m": GGUFDownload("q4_k_m", "4-bit weights (Q4_K_M, made by llama.cpp's quantizer)"),
}
FORMAT_GROUPS = {"gguf": [name for name in FORMATS if name.startswith("gguf_")]}


def package_format(single: DownloadFormat, model_dir: Path, download_dir: Path) -> dict:
    """`<name><suffix>` for one model, or the reason it has none (an old file of that name goes:
    SHA256SUMS and DOWNLOAD.md must not offer a file of an earlier model)."""
    output = download_dir / f"{model_dir.name}{single.suffix}"
    reason = single.write(model_dir, output)
    if reason is not None:
        with storage_errors(output, "removing"):
            output.unlink(missing_ok=True)
        log.info(f"no {output.name}: {reason}")
        return {"suffix": single.suffix, "file": None, "reason": reason, "family": single.family}
    generation = read_json_object(model_dir / "generation_config.json")
    defaults = {key: generation.get(key, value) for key, value in GENERATION_DEFAULTS.items()}
    return {"suffix": single.suffix, "file": output.name, "bytes": output.stat().st_size, "family": single.family,
            "label": single.label, "usage": single.usage(output, defaults)}


def package_all(models_dir: Path, download_dir: Path, names: list[str] | None = None,
                formats: list[DownloadFormat] = ()) -> list[Path]:
    """Archive every trained model in `models_dir` (and write each of `formats` it can express),
    then write SHA256SUMS over every download and DOWNLOAD.md. Returns the files written."""
    from model_registry import kind_of_folder

    names = names or finished_models(models_dir)
    written, info = [], {}
    for name in names:
        archive = package_model(models_dir / name, download_dir / f"{name}.tar.gz")
        singles = [package_format(single, models_dir / name, download_dir) for single in formats]
        written += [archive] + [download_dir / s["file"] for s in singles if s["file"]]
        kind = kind_of_folder(models_dir / name)
        info[name] = {**describe_model(models_dir / name, bool(kind and kind.trust_remote_code)),
                      "archive_bytes": archive.stat().st_size,
                      "files": [m.split("/", 1)[1] for m in archive_listing(archive)], "formats": singles}
    patterns = ["*.tar.gz", *(f"*{single.suffix}" for single in formats)]
    existing = {p for pattern in patterns for p in download_dir.glob(pattern)} - set(written)
    write_sha256sums(download_dir, written + sorted(existing))
    write_download_md(download_dir, info)
    return written


def check_folders(models_dir: Path, names: list[str] | None, download_dir: Path) -> list[str]:
    """The model folders to package, each finished and held by nobody; the download folder writable."""
    if not models_dir.is_dir():
        raise UserError(f"--models_dir {models_dir} is not a folder; train the models first")
    missing = [n for n in names or [] if not (models_dir / n / MODEL_MANIFEST).is_file() or Path(n).name != n]
    if missing:
        raise UserError(f"no finished model (with {MODEL_MANIFEST}) in "
                        f"{', '.join(str(models_dir / n) for n in missing)}")
    names = names or finished_models(models_dir)
    if not names:
        raise UserError(f"no finished model (with {MODEL_MANIFEST}) in {models_dir}; train the models first")
    problem = folder_problem(download_dir, "--download_dir")
    if problem:
        raise UserError(problem)
    for name in names:
        holder = folder_holder(models_dir / name)
        if holder is not None:
            raise UserError(in_use_message(models_dir / name, holder))
    return names


def main(argv=None) -> None:
    """Archive finished models (plus each --formats file), write SHA256SUMS and DOWNLOAD.md."""
    parser = OneLineParser(prog=PROG, description="Archive trained models with SHA256SUMS and DOWNLOAD.md")
    parser.add_argument("--models_dir", type=Path, default=Path("models"))
    parser.add_argument("--download_dir", type=Path, default=Path("models_for_download"))
    parser.add_argument("--names", nargs="*", help="model folders (default: every folder of --models_dir that holds "
                                                   "a finished model)")
    parser.add_argument("--formats", nargs="*", default=[], choices=sorted(FORMATS) + sorted(FORMAT_GROUPS),
                        help="single-file formats written beside each archive of a model they can express "
                             "(train_all_models.py passes all of them; gguf: every GGUF file); default: none")
    args = parser.parse_args(argv)
    names = check_folders(args.models_dir, args.names, args.download_dir)
    chosen = dict.fromkeys(key for f in args.formats for key in FORMAT_GROUPS.get(f, [f]))
    for path in package_all(args.models_dir, args.download_dir, names, [FORMATS[key] for key in chosen]):
        log.info(f"packaged {path} ({path.stat().st_size:,} bytes)")
    log.info(f"wrote {args.download_dir / SUMS_NAME} and {args.download_dir / 'DOWNLOAD.md'}")


if __name__ == "__main__":
    run_cli(PROG, main, sys.argv[1:])
