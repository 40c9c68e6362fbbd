"""The corpus on disk: which files there are, which split each belongs to, and their text.

A corpus folder holds the Bible built by prepare.py (listed in manifest.json with its split)
plus any UTF-8 .txt/.md/.jsonl files a user drops in ("bring your own corpus"). Extra files
are training text when a manifest with held-out books exists; in a folder without a manifest,
the last 5% of each file's lines is held out instead.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError
from .fileio import sha256_file

MANIFEST_NAME = "manifest.json"
VERSES_NAME = "verses.jsonl"
BUILD_MARKER = ".build_incomplete"
CORPUS_SUFFIXES = (".txt", ".md", ".jsonl")
# Files of the builder itself that live in the folder but are not training text.
NOT_CORPUS = {"README.md", "LICENSES.md", MANIFEST_NAME, VERSES_NAME}
IGNORED_SUFFIXES = (".py", ".json", ".gitignore", ".xz")
BYO_VAL_FRACTION = 0.05
PREPARE_HINT = "build it with: python3 mvlm_training_dataset_complete/prepare.py"


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


def load_corpus(data_dir: str | Path) -> Corpus:
    """Index a corpus folder, checking that every file is readable UTF-8 text."""
    root = Path(data_dir).resolve()
    if not root.exists():
        raise UserError(f"data dir {data_dir} does not exist; {PREPARE_HINT}")
    if not root.is_dir():
        raise UserError(f"data dir {data_dir} is not a folder")
    if (root / BUILD_MARKER).exists():
        raise UserError(f"the corpus build in {data_dir} was interrupted; rerun prepare.py")
    manifest = None
    files: list[CorpusFile] = []
    listed: set[str] = set()
    if (root / MANIFEST_NAME).is_file():
        try:
            manifest = json.loads((root / MANIFEST_NAME).read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise UserError(f"{root / MANIFEST_NAME} is corrupt; rebuild the corpus ({PREPARE_HINT})") from None
        for entry in manifest.get("files", []):
            path = root / entry["path"]
            if not path.is_file():
                raise UserError(f"{path} is listed in the manifest but missing; {PREPARE_HINT}")
            files.append(CorpusFile(path, entry["path"], entry["split"], sha256_file(path)))
            listed.add(entry["path"])
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root)
        if not path.is_file() or rel.as_posix() in listed or not _is_extra_candidate(rel):
            continue
        if path.suffix.lower() in CORPUS_SUFFIXES:
            read_documents(path)  # validates UTF-8 / JSON now, with the file named
            split = "train" if manifest else "split"
            files.append(CorpusFile(path, rel.as_posix(), split, sha256_file(path)))
        elif not path.name.endswith(IGNORED_SUFFIXES):
            raise UserError(f"{path} is not a corpus file; the corpus folder takes UTF-8 .txt, .md "
                            "or .jsonl files (move it elsewhere)")
    if not files:
        raise UserError(f"data dir {data_dir} holds no corpus files; {PREPARE_HINT}")
    return Corpus(root, tuple(files), manifest)
