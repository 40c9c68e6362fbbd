"""Corpus builder and reader: content, held-out split, determinism, bad input."""
import json
import re
import shutil

import pytest

from conftest import PREPARE, SMALL_BOOKS, assert_one_line_error, run_ok, run_script
from mvlm_engine.corpus import load_corpus
from mvlm_engine.errors import UserError

HELD_OUT = {"Ruth", "Jonah", "Philippians"}  # the held-out books among SMALL_BOOKS
VERSE_LINE = re.compile(r"^\[(\w+)\] ((?:\d )?[A-Za-z ]+?) (\d+):(\d+) ")


def test_files_name_translation_and_reference(small_corpus):
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    assert {t["code"] for t in manifest["translations"]} == {"KJV", "WEB", "ASV", "MONT"}
    john = (small_corpus / "KJV" / "43_John.txt").read_text().splitlines()
    assert john[0] == "# King James Version (KJV): John"
    assert "[KJV] John 3:16 For God so loved the world, that he gave his only begotten Son" in "\n".join(john)
    # MONT is New Testament only: no Old Testament files.
    assert not (small_corpus / "MONT" / "08_Ruth.txt").exists()
    assert (small_corpus / "MONT" / "43_John.txt").exists()


def test_manifest_sha256_and_sizes_match_files(small_corpus):
    import hashlib
    manifest = json.loads((small_corpus / "manifest.json").read_text())
    for entry in manifest["files"]:
        data = (small_corpus / entry["path"]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == entry["sha256"]
        assert len(data) == entry["bytes"]


@pytest.mark.e2e
def test_held_out_books_never_in_training_split(tmp_path):
    # Every translation, including the New-Testament-only and Old-Testament-only ones.
    out = tmp_path / "all"
    proc = run_script(PREPARE, "--output_dir", out, "--translations", "all", "--books", SMALL_BOOKS)
    assert proc.returncode == 0, proc.stderr
    corpus = load_corpus(out)
    manifest = corpus.manifest
    assert set(manifest["heldout_books"]) == HELD_OUT
    seen = {"train": set(), "val": set()}
    for split in ("train", "val"):
        for document in corpus.documents(split):
            for line in document.splitlines()[1:]:
                match = VERSE_LINE.match(line)
                assert match, line
                seen[split].add((match.group(1), match.group(2)))
    train_books = {book for _, book in seen["train"]}
    val_books = {book for _, book in seen["val"]}
    assert train_books == {"John", "Mark"}
    assert val_books == HELD_OUT
    # Held out in every translation that has the book (Leeser is OT-only, MONT NT-only).
    assert {code for code, book in seen["val"] if book == "Philippians"} >= {"KJV", "MONT", "WEB"}
    assert {code for code, book in seen["val"] if book == "Ruth"} >= {"KJV", "LEESER"}
    for line in (out / "verses.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["split"] == ("val" if record["book"] in HELD_OUT else "train")


@pytest.mark.e2e
def test_build_is_deterministic(small_corpus, tmp_path):
    from conftest import SMALL_TRANSLATIONS
    again = tmp_path / "again"
    proc = run_script(PREPARE, "--output_dir", again, "--translations", SMALL_TRANSLATIONS, "--books", SMALL_BOOKS)
    assert proc.returncode == 0, proc.stderr
    assert (again / "manifest.json").read_bytes() == (small_corpus / "manifest.json").read_bytes()


@pytest.mark.e2e
def test_rebuild_replaces_previous_build(tmp_path):
    assert run_script(PREPARE, "--output_dir", tmp_path, "--translations", "KJV,WEB", "--books", "Ruth").returncode == 0
    assert run_script(PREPARE, "--output_dir", tmp_path, "--translations", "ASV", "--books", "Ruth").returncode == 0
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_dir()) == ["ASV"]
    assert not (tmp_path / ".build_incomplete").exists()


def test_extra_user_files_join_the_training_split(small_corpus, tmp_path):
    corpus_dir = tmp_path / "byo"
    shutil.copytree(small_corpus, corpus_dir)
    (corpus_dir / "notes").mkdir()
    (corpus_dir / "notes" / "sermon.md").write_text("A sermon about patience and hope.\n")
    (corpus_dir / "extra.jsonl").write_text(json.dumps({"text": "Psalm of the extra file."}) + "\n")
    corpus = load_corpus(corpus_dir)
    train = list(corpus.documents("train"))
    assert "A sermon about patience and hope.\n" in train
    assert "Psalm of the extra file." in train
    assert not any("sermon" in doc for doc in corpus.documents("val"))
    assert corpus.hash != load_corpus(small_corpus).hash


def test_folder_without_manifest_holds_out_each_files_tail(tmp_path):
    lines = [f"line {i}\n" for i in range(100)]
    (tmp_path / "book.txt").write_text("".join(lines))
    corpus = load_corpus(tmp_path)
    assert "".join(corpus.documents("train")) == "".join(lines[:95])
    assert "".join(corpus.documents("val")) == "".join(lines[95:])


@pytest.mark.parametrize("name, content, needle", [
    ("bad.txt", b"caf\xe9 au lait\n", "not UTF-8"),
    ("blob.txt", b"\x00\x01\x02binary", "binary"),
    ("image.png", b"\x89PNG\r\n", "not a corpus file"),
    ("broken.jsonl", b'{"text": 1}\n', '"text"'),
])
def test_unreadable_corpus_files_are_named(tmp_path, name, content, needle):
    (tmp_path / "good.txt").write_text("fine text\n")
    (tmp_path / name).write_bytes(content)
    with pytest.raises(UserError, match=needle) as err:
        load_corpus(tmp_path)
    assert name in str(err.value)


def test_missing_and_empty_data_dirs(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        load_corpus(tmp_path / "nowhere")
    with pytest.raises(UserError, match="no corpus files"):
        load_corpus(tmp_path)


def test_interrupted_build_is_refused(small_corpus, tmp_path):
    corpus_dir = tmp_path / "half"
    shutil.copytree(small_corpus, corpus_dir)
    (corpus_dir / ".build_incomplete").write_text("")
    with pytest.raises(UserError, match="interrupted"):
        load_corpus(corpus_dir)


@pytest.mark.e2e
def test_builder_bad_input_is_one_line(tmp_path):
    proc = run_script(PREPARE, "--output_dir", tmp_path / "x", "--translations", "KJV,NOPE", "--books", "Ruth")
    assert_one_line_error(proc, "unknown translation 'NOPE'")
    proc = run_script(PREPARE, "--output_dir", tmp_path / "x", "--books", "Ruthless")
    assert_one_line_error(proc, "unknown book 'Ruthless'")
    (tmp_path / "file").write_text("")
    proc = run_script(PREPARE, "--output_dir", tmp_path / "file", "--books", "Ruth")
    assert_one_line_error(proc, "is a file")
    assert not (tmp_path / "x").exists()


def test_licence_table_matches_the_builder():
    import importlib.util
    from conftest import REPO
    spec = importlib.util.spec_from_file_location("prepare", PREPARE)
    prepare = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(prepare)
    rows = [line.split(" | ") for line in (REPO / "mvlm_training_dataset_complete" / "LICENSES.md").read_text()
            .splitlines() if line.startswith("| ") and not line.startswith("| code") and "---" not in line]
    table = {row[0].strip("| "): (row[1], row[2], row[3].strip(" |") == "yes") for row in rows}
    expected = {code: (status, note, code in prepare.DEFAULT_TRANSLATIONS)
                for code, (status, note) in prepare.TRANSLATIONS.items()}
    assert table == expected
    assert len(prepare.DEFAULT_TRANSLATIONS) >= 20


@pytest.mark.e2e
def test_rebuild_from_compressed_verses_needs_no_pythonbible_and_matches(small_corpus, tmp_path):
    import lzma
    pack = tmp_path / "pack"
    pack.mkdir()
    (pack / "verses.jsonl.xz").write_bytes(lzma.compress((small_corpus / "verses.jsonl").read_bytes()))
    shutil.copy(small_corpus / "manifest.json", pack / "manifest.json")
    blocker = tmp_path / "no_pythonbible"
    blocker.mkdir()
    (blocker / "pythonbible.py").write_text("raise ImportError('pythonbible is not installed here')\n")
    os = __import__("os")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(blocker), os.environ.get("PYTHONPATH")]))}
    proc = run_script(PREPARE, "--from_verses", pack / "verses.jsonl.xz", "--output_dir", tmp_path / "rebuilt", env=env)
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "rebuilt" / "manifest.json").read_bytes() == (small_corpus / "manifest.json").read_bytes()
    assert (tmp_path / "rebuilt" / "verses.jsonl").read_bytes() == (small_corpus / "verses.jsonl").read_bytes()


@pytest.mark.e2e
def test_a_slice_rebuilt_from_verses_equals_the_same_slice_built_from_pythonbible(small_corpus, tmp_path):
    # The CPU proxy (benchmarks/slowrun.py) cuts its slice out of verses.jsonl, where pythonbible may be absent.
    direct = tmp_path / "direct"
    run_ok(PREPARE, "--output_dir", direct, "--translations", "KJV,MONT", "--books", "John,Philippians")
    sliced = tmp_path / "sliced"
    run_ok(PREPARE, "--from_verses", small_corpus / "verses.jsonl", "--output_dir", sliced,
           "--translations", "kjv,MONT", "--books", "john,Philippians")
    for name in ("manifest.json", "verses.jsonl"):
        assert (sliced / name).read_bytes() == (direct / name).read_bytes(), name
    manifest = json.loads((sliced / "manifest.json").read_text())
    assert manifest["heldout_books"] == ["Philippians"]
    assert {f["book"] for f in manifest["files"]} == {"John", "Philippians"}
    proc = run_script(PREPARE, "--from_verses", small_corpus / "verses.jsonl", "--output_dir", tmp_path / "bad",
                      "--books", "John,Genesis", "--translations", "KJV,NOPE")
    assert_one_line_error(proc, "unknown book 'Genesis'", "unknown translation 'NOPE'")
    assert not (tmp_path / "bad").exists()
