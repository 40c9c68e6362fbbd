#!/usr/bin/env python3
"""Build the public-domain Bible corpus from the pythonbible translation packages.

    python3 mvlm_training_dataset_complete/prepare.py                      # default build
    python3 mvlm_training_dataset_complete/prepare.py --translations KJV,WEB --books Ruth,John

Output (deterministic: a second build gives byte-identical files):
    <out>/<CODE>/<NN>_<Book>.txt   one file per book; a header line naming the translation,
                                   then one verse per line: "[KJV] John 3:16 For God so ..."
    <out>/verses.jsonl             one JSON object per verse (translation, book, chapter, verse,
                                   split, text); the parallel pairs for content alignment
    <out>/manifest.json            files with sha256/bytes/chars/split, translations used and why,
                                   the held-out books

The held-out split is whole books, the same in every translation, with Old and New
Testament books, so the validation loss is not flattered by the same verse in another wording.
"""
from __future__ import annotations

import argparse
import json
import lzma
import os
import shutil
import sys
from importlib import import_module
from pathlib import Path

from mvlm_engine.corpus import BUILD_MARKER, MANIFEST_NAME, VERSES_NAME
from mvlm_engine.cli import OneLineParser, run_cli
from mvlm_engine.errors import UserError, fail
from mvlm_engine.fileio import atomic_write_text, folder_problem, fsync_dir, sha256_file, storage_errors
from mvlm_engine.locks import lock_folder
from mvlm_engine.logs import get_logger

log = get_logger("corpus")

# Whole books held out of training in every translation: three Old Testament, two New.
HELD_OUT_BOOKS = ("Ruth", "Ecclesiastes", "Jonah", "Philippians", "Colossians")

PUBLIC_DOMAIN = "public domain"
# code -> (licence status, why). Only clearly public-domain texts are in the default build.
TRANSLATIONS: dict[str, tuple[str, str]] = {
    "KJV": (PUBLIC_DOMAIN, "1769 Oxford text; public domain outside the UK (Crown patent there)"),
    "AKJV": (PUBLIC_DOMAIN, "American King James Version (1999), dedicated to the public domain by its author"),
    "ASV": (PUBLIC_DOMAIN, "American Standard Version, 1901"),
    "BBE": (PUBLIC_DOMAIN, "Bible in Basic English (1949/1964), public domain in the United States"),
    "DAR": (PUBLIC_DOMAIN, "Darby translation, 1890"),
    "Diaglot": (PUBLIC_DOMAIN, "Emphatic Diaglott New Testament, 1865"),
    "DR": (PUBLIC_DOMAIN, "Douay-Rheims, Challoner revision 1752 / 1899 American edition"),
    "ROTH": (PUBLIC_DOMAIN, "Rotherham's Emphasized Bible, 1902"),
    "GB": (PUBLIC_DOMAIN, "Geneva Bible, 1599"),
    "LEESER": (PUBLIC_DOMAIN, "Leeser Old Testament, 1853"),
    "LONT": (PUBLIC_DOMAIN, "Living Oracles New Testament, 1835"),
    "MONT": (PUBLIC_DOMAIN, "Montgomery New Testament, 1924; US copyright expired in 2020"),
    "NHEB": (PUBLIC_DOMAIN, "New Heart English Bible, dedicated to the public domain"),
    "OEB": (PUBLIC_DOMAIN, "Open English Bible, dedicated to the public domain (CC0)"),
    "ETHERIDGE": (PUBLIC_DOMAIN, "Etheridge's Peshitta New Testament, 1849"),
    "RWEBSTER": (PUBLIC_DOMAIN, "Revised Webster version, 1833"),
    "UKJV": (PUBLIC_DOMAIN, "Updated King James Version (2000), dedicated to the public domain by its author"),
    "WBS": (PUBLIC_DOMAIN, "Webster Bible, 1833"),
    "WESLEY": (PUBLIC_DOMAIN, "Wesley's New Testament, 1755"),
    "WMTH": (PUBLIC_DOMAIN, "Weymouth New Testament, 1903"),
    "TYN": (PUBLIC_DOMAIN, "Tyndale Bible, 1526-1530"),
    "WEB": (PUBLIC_DOMAIN, "World English Bible, dedicated to the public domain"),
    "WYC": (PUBLIC_DOMAIN, "Wycliffe Bible, 14th century"),
    "YLT": (PUBLIC_DOMAIN, "Young's Literal Translation, 1862/1898"),
    "BWE": ("free to copy, not public domain", "Bible in WorldWide English NT (SOON Educational Publications)"),
    "MKJV1963": ("status not verified", "Green's Modern KJV 1963; public-domain status could not be confirmed"),
    "RYLT": ("status not verified", "Revised Young's Literal NT; public-domain status could not be confirmed"),
}
DEFAULT_TRANSLATIONS = tuple(code for code, (status, _) in TRANSLATIONS.items() if status == PUBLIC_DOMAIN)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="prepare.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", type=Path, default=Path(__file__).resolve().parent,
                        help="where the corpus is written (default: this folder)")
    parser.add_argument("--translations", default="default",
                        help="comma-separated codes (e.g. KJV,WEB), 'default' (the clearly public-domain "
                             f"ones: {len(DEFAULT_TRANSLATIONS)}) or 'all' ({len(TRANSLATIONS)})")
    parser.add_argument("--from_verses", type=Path, default=None,
                        help="rebuild from a verses.jsonl (or .jsonl.xz) of an earlier build, with its manifest.json "
                             "beside it; needs no pythonbible (for machines without it, e.g. a GPU box)")
    parser.add_argument("--books", default="all",
                        help="comma-separated book names to limit the build (e.g. Ruth,John,Philippians); "
                             "'all' by default; with --from_verses, a slice of that build (the held-out books "
                             "among them stay held out)")
    return parser.parse_args(argv)


def pick_names(listed: str, known: dict[str, str], flag: str, unknown_hint: str, errors: list[str]) -> list[str]:
    """The canonical names in a comma-separated list (matched case-insensitively against `known`,
    lower-case name -> canonical); each unknown name, or an empty list, adds one error."""
    picked = []
    for name in filter(None, (n.strip() for n in listed.split(","))):
        if name.lower() in known:
            picked.append(known[name.lower()])
        else:
            errors.append(f"unknown {flag.strip('-').rstrip('s')} '{name}' ({unknown_hint})")
    if not picked and not errors:
        errors.append(f"{flag} is empty")
    return picked


def resolve_selection(args: argparse.Namespace) -> tuple[list[str], set[str] | None]:
    """Check the requested translations and books; collect every problem into one error."""
    import pythonbible

    errors = []
    if args.translations in ("default", "all"):
        codes = list(DEFAULT_TRANSLATIONS if args.translations == "default" else TRANSLATIONS)
    else:
        codes = pick_names(args.translations, {code.lower(): code for code in TRANSLATIONS}, "--translations",
                           f"known: {', '.join(TRANSLATIONS)}", errors)
    books = None
    if args.books != "all":
        titles = {book.title.lower(): book.title for book in pythonbible.Book}
        books = set(pick_names(args.books, titles, "--books",
                               "use names like 'John', '1 Samuel', 'Song of Songs'", errors))
    problem = folder_problem(args.output_dir, "--output_dir")
    fail(errors + ([problem] if problem else []))
    return sorted(dict.fromkeys(codes), key=list(TRANSLATIONS).index), books


def load_bible(code: str):
    """The pythonbible plain-text Bible object for one translation package."""
    try:
        return import_module(f"pythonbible_{code.lower()}.plain_text_readers_bible").bible
    except ModuleNotFoundError:
        raise UserError(f"translation package pythonbible-{code.lower()} is not installed; "
                        "run ./setup_environment.sh (or pip install -r requirements.txt)") from None


def clean_verse(text: str) -> str:
    return " ".join(text.split())


def build_translation(code: str, books: set[str] | None) -> dict[str, list[tuple[int, int, str]]]:
    """Return {book title: [(chapter, verse, text), ...]} in canonical order."""
    import pythonbible

    bible = load_bible(code)
    by_book: dict[str, list[tuple[int, int, str]]] = {}
    for verse_id in sorted(bible.verse_start_indices):
        book_number, chapter, verse = verse_id // 1_000_000, verse_id // 1000 % 1000, verse_id % 1000
        title = pythonbible.Book(book_number).title
        if books is not None and title not in books:
            continue
        text = clean_verse(bible.get_scripture(verse_id, verse_id))
        if text:
            by_book.setdefault(title, []).append((chapter, verse, text))
    return by_book


def book_file_name(book_number: int, title: str) -> str:
    return f"{book_number:02d}_{title.replace(' ', '_')}.txt"


def pythonbible_source(codes: list[str], books: set[str] | None):
    """Yield (code, title, {book: verses}) from the installed translation packages."""
    for code in codes:
        yield code, load_bible(code).version.title, build_translation(code, books)


def pythonbible_book_numbers() -> dict[str, int]:
    import pythonbible

    return {book.title: book.value for book in pythonbible.Book}


def verses_source(path: Path):
    """(translations, book numbers, earlier manifest) from an earlier build's verses.jsonl[.xz];
    every record is checked, and a bad one is named in one line."""
    manifest_path = path.parent / MANIFEST_NAME
    if not path.is_file() or not manifest_path.is_file():
        raise UserError(f"--from_verses needs {path} and {manifest_path} (both from the same build)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
        titles = {t["code"]: t["title"] for t in manifest["translations"]}
        book_numbers = {f["book"]: int(Path(f["path"]).name.split("_", 1)[0]) for f in manifest["files"]}
        heldout, source = list(manifest["heldout_books"]), str(manifest["source"])
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError) as err:
        raise UserError(f"{manifest_path} is not a manifest of prepare.py ({type(err).__name__}: {err})") from None
    grouped: dict[str, dict[str, list]] = {}
    try:
        with (lzma.open(path, "rt", encoding="utf-8") if path.suffix == ".xz" else open(path, encoding="utf-8")) as handle:
            for number, line in enumerate(handle, 1):
                code, book, verse = verse_record(line, titles, book_numbers, f"{path}:{number}")
                grouped.setdefault(code, {}).setdefault(book, []).append(verse)
    except (OSError, UnicodeDecodeError, lzma.LZMAError, EOFError) as err:
        raise UserError(f"{path} cannot be read ({type(err).__name__}: {err})") from None
    if not grouped:
        raise UserError(f"{path} holds no verses")
    manifest.update(heldout_books=heldout, source=source)
    return [(code, titles[code], by_book) for code, by_book in grouped.items()], book_numbers, manifest


def select_from_verses(args: argparse.Namespace, translations: list, book_numbers: dict[str, int]):
    """--translations and --books applied to an earlier build's verses, checked against what it
    holds (every problem in one error): (the translations kept, their books filtered; the book
    names kept, None for all)."""
    errors = []
    codes = [code for code, _, _ in translations]
    if args.translations not in ("default", "all"):
        keep = set(pick_names(args.translations, {code.lower(): code for code in codes}, "--translations",
                              f"the verses hold: {', '.join(codes)}", errors))
        translations = [t for t in translations if t[0] in keep]
    books = None
    if args.books != "all":
        books = set(pick_names(args.books, {book.lower(): book for book in book_numbers}, "--books",
                               "use names like 'John', '1 Samuel', as the verses' manifest spells them", errors))
    fail(errors)
    if books is not None:
        translations = [(code, title, {b: v for b, v in by_book.items() if b in books})
                        for code, title, by_book in translations]
    return translations, books


def verse_record(line: str, titles: dict, book_numbers: dict, where: str) -> tuple[str, str, tuple]:
    """(translation, book, (chapter, verse, text)) of one verses.jsonl line, or a UserError naming it."""
    try:
        r = json.loads(line)
        code, book, chapter, verse, text = (r[k] for k in ("translation", "book", "chapter", "verse", "text"))
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UserError(f"{where} is not a verse record (translation, book, chapter, verse, text)") from None
    if code not in titles or book not in book_numbers:
        raise UserError(f"{where}: translation {code!r} or book {book!r} is not in the manifest beside it")
    if not (isinstance(chapter, int) and isinstance(verse, int) and chapter > 0 and verse > 0 and isinstance(text, str)
            and text and "\n" not in text):
        raise UserError(f"{where}: chapter and verse must be positive numbers and text one non-empty line")
    return code, book, (chapter, verse, text)


def write_corpus(stage: Path, translations, book_numbers: dict[str, int], heldout: list[str], source: str) -> dict:
    """Write every file into `stage` and return the manifest (without timestamps: deterministic).

    translations: (code, title, {book: [(chapter, verse, text), ...]}) in build order.
    """
    files, summaries = [], []
    with open(stage / VERSES_NAME, "w", encoding="utf-8", newline="\n") as verses_out:
        for code, title, by_book in translations:
            (stage / code).mkdir()
            chars = 0
            for book, verses in sorted(by_book.items(), key=lambda item: book_numbers[item[0]]):
                split = "val" if book in HELD_OUT_BOOKS else "train"
                lines = [f"# {title} ({code}): {book}"]
                for chapter, verse, text in verses:
                    lines.append(f"[{code}] {book} {chapter}:{verse} {text}")
                    verses_out.write(json.dumps({"translation": code, "book": book, "chapter": chapter,
                                                 "verse": verse, "split": split, "text": text},
                                                ensure_ascii=False) + "\n")
                rel = f"{code}/{book_file_name(book_numbers[book], book)}"
                body = "\n".join(lines) + "\n"
                (stage / rel).write_text(body, encoding="utf-8", newline="\n")
                chars += len(body)
                files.append({"path": rel, "translation": code, "book": book, "split": split,
                              "chars": len(body), "bytes": len(body.encode("utf-8")),
                              "sha256": sha256_file(stage / rel)})
            status, why = TRANSLATIONS[code]
            summaries.append({"code": code, "title": title, "licence": status, "note": why,
                              "books": len(by_book), "chars": chars})
    if not files:
        raise UserError("the selection produced no verses; check --translations and --books")
    codes = [t["code"] for t in summaries]
    excluded = [{"code": code, "licence": TRANSLATIONS[code][0], "note": TRANSLATIONS[code][1]}
                for code in TRANSLATIONS if code not in codes]
    return {
        "format_version": 1,
        "source": source,
        "licence_policy": "the default build uses only translations that are clearly public domain; "
                          "'excluded' lists the others and why (add them with --translations all)",
        "heldout_books": heldout,
        "translations": summaries,
        "excluded_translations": excluded,
        "total_chars": sum(f["chars"] for f in files),
        "files": files,
        "verses_jsonl": {"path": VERSES_NAME, "sha256": sha256_file(stage / VERSES_NAME),
                         "bytes": (stage / VERSES_NAME).stat().st_size},
    }


def written_by_prepare(path: Path) -> bool:
    """Whether `path` (a translation folder or verses.jsonl in the output folder) is an earlier
    build's: only those are replaced; anything else of the user's makes the build stop first."""
    if path.name == VERSES_NAME and path.is_file():
        with open(path, encoding="utf-8", errors="replace") as handle:
            first = handle.readline()
        return not first.strip() or first.startswith('{"translation": ')
    if not path.is_dir():
        return False
    for child in path.iterdir():
        if not (child.is_file() and child.suffix == ".txt" and child.name[:2].isdigit()):
            return False
        with open(child, encoding="utf-8", errors="replace") as handle:
            if f"({path.name}): " not in handle.readline():
                return False
    return True


def check_no_clash(stage: Path, out: Path) -> None:
    clashes = sorted(entry.name for entry in stage.iterdir()
                     if (out / entry.name).exists() and not written_by_prepare(out / entry.name))
    if clashes:
        raise UserError(f"--output_dir {out} already holds {', '.join(clashes)}, which prepare.py did not write; "
                        "move them away or choose another folder (nothing was changed)")


def install(stage: Path, out: Path, manifest: dict) -> None:
    """Swap the staged build into place. The marker makes readers refuse a half-swapped folder."""
    check_no_clash(stage, out)
    marker = out / BUILD_MARKER
    marker.write_text("corpus build in progress; rerun prepare.py if this file stays\n")
    fsync_dir(out)
    old_manifest = out / MANIFEST_NAME
    if old_manifest.is_file():
        try:
            previous = json.loads(old_manifest.read_text())
            codes = {f["translation"] for f in previous.get("files", [])}
        except (ValueError, KeyError, TypeError, AttributeError):
            codes = set()  # a damaged manifest: its folders are replaced below only if they are ours
        old_manifest.unlink()
        for code in codes:
            if isinstance(code, str) and Path(code).name == code and (out / code).is_dir() \
                    and written_by_prepare(out / code):
                shutil.rmtree(out / code)
    for entry in sorted(stage.iterdir()):
        target = out / entry.name
        if target.is_dir():
            shutil.rmtree(target)
        os.replace(entry, target)
    atomic_write_text(out / MANIFEST_NAME, json.dumps(manifest, indent=1, ensure_ascii=False) + "\n")
    marker.unlink()
    fsync_dir(out)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    out = args.output_dir.resolve()
    if args.from_verses:
        fail([p for p in [folder_problem(out, "--output_dir")] if p])
        translations, book_numbers, earlier = verses_source(args.from_verses.resolve())
        translations, books = select_from_verses(args, translations, book_numbers)
        heldout = [b for b in earlier["heldout_books"] if books is None or b in books]
        source = earlier["source"]
    else:
        import pythonbible

        codes, books = resolve_selection(args)
        translations, book_numbers = pythonbible_source(codes, books), pythonbible_book_numbers()
        heldout = [b for b in HELD_OUT_BOOKS if books is None or b in books]
        source = f"pythonbible {pythonbible.__version__} translation packages (plain_text_readers)"
    lock = lock_folder(out, "prepare.py corpus build")  # noqa: F841 (held until the end)
    stage = out / ".building"  # a dead build's is removed here: we hold the folder's lock
    try:
        with storage_errors(stage, "writing the corpus"):
            shutil.rmtree(stage, ignore_errors=True)
            stage.mkdir()
            manifest = write_corpus(stage, translations, book_numbers, heldout, source)
            install(stage, out, manifest)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    log.info(f"{len(manifest['translations'])} translations, {len(manifest['files'])} files, "
             f"{manifest['total_chars']:,} characters -> {out}")
    log.info(f"held-out books: {', '.join(manifest['heldout_books']) or 'none (no validation split!)'}")


if __name__ == "__main__":
    run_cli("prepare.py", main, sys.argv[1:])
