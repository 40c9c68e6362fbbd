"""The corpus on disk: which files there are, which split each belongs to, and their text.

A corpus folder holds the Bible built by prepare.py (listed in manifest.json with its split)
plus any UTF-8 .txt/.md/.jsonl files a user drops in ("bring your own corpus"). Extra files
are training text when a manifest with held-out books exists; in a folder without a manifest,
the last 5% of each file's lines is held out instead (and said so). A folder that prepare.py
built but whose manifest is gone is refused: its held-out books would become training text.
The manifest is checked, not trusted: its schema, that every path stays inside the folder, and
every file's size and sha256 (the hashes are computed anyway, for the corpus hash).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .fileio import sha256_file
from .logs import get_logger

MANIFEST_NAME = "manifest.json"
VERSES_NAME = "verses.jsonl"
BUILD_MARKER = ".build_incomplete"
CORPUS_SUFFIXES = (".txt", ".md", ".jsonl")
# Files of the builder itself that live in the folder but are not training text.
NOT_CORPUS = {"README.md", "LICENSES.md", MANIFEST_NAME, VERSES_NAME}
IGNORED_SUFFIXES = (".py", ".json", ".gitignore", ".xz")
BYO_VAL_FRACTION = 0.05
PREPARE_HINT = "build it with: python3 mvlm_training_dataset_complete/prepare.py"
SPLITS = ("train", "val")
SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
log = get_logger("corpus")


@dataclass(frozen=True)
class CorpusFile:
    path: Path
    rel: str
    split: str  # "train", "val", or "split" (a user file whose tail is held out)
    sha256: str


@dataclass(frozen=True)
class Corpus:
    root: Path
    files: tuple[CorpusFile, ...]
    manifest: dict | None

    @property
    def hash(self) -> str:
        """Identity of the training and validation text: changes when any file or split does."""
        digest = hashlib.sha256()
        for f in self.files:
            digest.update(f"{f.rel}\0{f.split}\0{f.sha256}\n".encode())
        return digest.hexdigest()

    def documents(self, split: str):
        """Yield the text documents of one split ("train" or "val"), in a fixed order."""
        for f in self.files:
            if f.split == split or f.split == "split":
                for text in read_documents(f.path):
                    if f.split == "split":
                        text = split_tail(text, split)
                    if text:
                        yield text


def read_text_strict(path: Path) -> str:
    data = path.read_bytes()
    if b"\0" in data:
        raise UserError(f"{path} looks binary (it contains NUL bytes); remove it from the corpus folder")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text (bad byte at offset {err.start}); "
                        "convert it to UTF-8 or remove it") from None


def read_documents(path: Path) -> list[str]:
    """A .txt/.md file is one document; a .jsonl file is one document per line's "text" field."""
    text = read_text_strict(path)
    if path.suffix != ".jsonl":
        return [text]
    documents = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            raise UserError(f"{path}:{number} is not valid JSON; each .jsonl line must be an object "
                            'with a "text" field') from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise UserError(f'{path}:{number} has no string "text" field')
        documents.append(record["text"])
    return documents


def split_tail(text: str, split: str) -> str:
    """The first 95% of lines for "train", the rest for "val" (for files without a manifest split)."""
    lines = text.splitlines(keepends=True)
    cut = len(lines) - max(1, round(len(lines) * BYO_VAL_FRACTION)) if len(lines) > 1 else len(lines)
    return "".join(lines[:cut] if split == "train" else lines[cut:])


def _is_extra_candidate(rel: Path) -> bool:
    if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
        return False
    return rel.name not in NOT_CORPUS and not rel.name.startswith("LICENSE")


def load_corpus(data_dir: str | Path, announce: bool = False) -> Corpus:
    """Index a corpus folder, checking the manifest against the files (schema, paths inside the
    folder, sizes and sha256) and that every file is readable UTF-8 text. `announce` logs the
    held-out policy of a folder without a manifest and the files the manifest does not list."""
    root = Path(data_dir).resolve()
    if not root.exists():
        raise UserError(f"data dir {data_dir} does not exist; {PREPARE_HINT}")
    if not root.is_dir():
        raise UserError(f"data dir {data_dir} is not a folder")
    if (root / BUILD_MARKER).exists():
        raise UserError(f"the corpus build in {data_dir} was interrupted; rerun prepare.py")
    manifest = read_manifest(root)
    if manifest is None and (evidence := built_by_prepare(root)):
        raise UserError(f"{root} was built by prepare.py ({evidence}) but its {MANIFEST_NAME} is missing, so its "
                        f"held-out books cannot be told from training text; rebuild it: python3 "
                        f"mvlm_training_dataset_complete/prepare.py --output_dir {root}")
    files = manifest_files(root, manifest) if manifest else []
    extra = extra_files(root, {f.rel for f in files}, "train" if manifest else "split")
    if not files + extra:
        raise UserError(f"data dir {data_dir} holds no corpus files; {PREPARE_HINT}")
    if announce and manifest is None:
        log.info(f"{root} has no {MANIFEST_NAME}: the last {BYO_VAL_FRACTION:.0%} of the lines of each of its "
                 f"{len(extra)} file(s) is held out for validation (a corpus built by prepare.py holds out whole books)")
    elif announce and extra:
        log.info(f"{len(extra)} file(s) not in {MANIFEST_NAME} join the training split: "
                 f"{', '.join(f.rel for f in extra[:5])}{' ...' if len(extra) > 5 else ''}")
    return Corpus(root, tuple(files + extra), manifest)


def extra_files(root: Path, listed: set[str], split: str) -> list[CorpusFile]:
    """User files beside the manifest's (or all files, without one), checked as text now."""
    found = []
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.as_posix() in listed or not _is_extra_candidate(rel):
            continue
        if path.suffix.lower() in CORPUS_SUFFIXES:
            read_documents(path)  # validates UTF-8 / JSON now, with the file named
            found.append(CorpusFile(path, rel.as_posix(), split, sha256_file(path)))
        elif not path.name.endswith(IGNORED_SUFFIXES):
            raise UserError(f"{path} is not a corpus file; the corpus folder takes UTF-8 .txt, .md "
                            "or .jsonl files (move it elsewhere)")
    return found


# --------------------------------------------------------------------------- the manifest


def read_manifest(root: Path) -> dict | None:
    """manifest.json, schema-checked, or None when the folder has none."""
    path = root / MANIFEST_NAME
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        raise UserError(f"{path} is corrupt; rebuild the corpus ({PREPARE_HINT})") from None
    problems = manifest_problems(manifest)
    if problems:
        more = f" (and {len(problems) - 1} more problems)" if len(problems) > 1 else ""
        raise UserError(f"{path} is damaged: {problems[0]}{more}; rebuild the corpus ({PREPARE_HINT})")
    return manifest


def manifest_problems(manifest) -> list[str]:
    if not isinstance(manifest, dict):
        return ["it is not a JSON object"]
    if not isinstance(manifest.get("files"), list):
        return ['"files" is missing or not a list']
    problems, seen = [], set()
    for number, entry in enumerate(manifest["files"], 1):
        if not isinstance(entry, dict):
            problems.append(f"file entry {number} is not an object")
            continue
        name = entry.get("path")
        if not isinstance(name, str) or not name:
            problems.append(f'file entry {number} has no "path"')
        elif name in seen:
            problems.append(f"{name} is listed twice")
        seen.add(name)
        if entry.get("split") not in SPLITS:
            problems.append(f"{name}: \"split\" is {entry.get('split')!r}, not one of {', '.join(SPLITS)}")
        if not isinstance(entry.get("sha256"), str) or not SHA256_HEX.match(entry["sha256"]):
            problems.append(f'{name}: "sha256" is not a sha256 hex digest')
        if "bytes" in entry and (not isinstance(entry["bytes"], int) or isinstance(entry["bytes"], bool)
                                 or entry["bytes"] < 0):
            problems.append(f'{name}: "bytes" is not a size')
    return problems


def manifest_files(root: Path, manifest: dict) -> list[CorpusFile]:
    """The manifest's files, each inside the folder and as the manifest recorded it (size, sha256)."""
    files = []
    for entry in manifest["files"]:
        path = (root / entry["path"]).resolve()
        if Path(entry["path"]).is_absolute() or root not in path.parents:
            raise UserError(f"{root / MANIFEST_NAME} lists {entry['path']}, which is outside the corpus folder "
                            f"{root}; rebuild the corpus ({PREPARE_HINT})")
        if not path.is_file():
            raise UserError(f"{path} is listed in the manifest but missing; {PREPARE_HINT}")
        if "bytes" in entry and path.stat().st_size != entry["bytes"]:
            raise UserError(f"{path} has {path.stat().st_size} bytes, {MANIFEST_NAME} says {entry['bytes']}: it "
                            f"was changed after the corpus was built; restore it or rebuild ({PREPARE_HINT})")
        digest = sha256_file(path)
        if digest != entry["sha256"]:
            raise UserError(f"{path} does not match its sha256 in {MANIFEST_NAME}: it was changed after the corpus "
                            f"was built; restore it or rebuild the corpus ({PREPARE_HINT})")
        files.append(CorpusFile(root / entry["path"], entry["path"], entry["split"], digest))
    return files


def built_by_prepare(root: Path) -> str | None:
    """What shows that prepare.py built this folder (its verses.jsonl or a book file), or None."""
    if (root / VERSES_NAME).is_file():
        return f"it has {VERSES_NAME}"
    for path in root.glob("*/[0-9][0-9]_*.txt"):
        code = path.parent.name
        with contextlib.suppress(OSError, UnicodeDecodeError):
            with open(path, encoding="utf-8") as handle:
                first = handle.readline()
            if first.startswith("# ") and f"({code}): " in first:
                return f"it has book files such as {path.relative_to(root)}"
    return None
