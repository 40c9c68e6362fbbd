"""The fault suite, caches and the corpus: damaged token caches are rebuilt (or named in one line),
an edited cached tokenizer is trained again, hostile or damaged manifests are refused (RELIABILITY.md
lists what each proves)."""
import json
import re
import shutil
import subprocess

import numpy as np
import pytest

from mvlm_engine.corpus import load_corpus
from mvlm_engine.errors import StorageError, UserError
from mvlm_engine.shards import build_token_shards
from mvlm_engine.tokenizer import get_or_train_tokenizer


# --------------------------------------------------------------------------- cache integrity


def fresh_cache(tokenized, tmp_path):
    corpus, tokenizer, _, cache = tokenized
    shutil.copytree(cache, tmp_path / "cache")
    shards = build_token_shards(corpus, tokenizer, tmp_path / "cache")
    return corpus, tokenizer, shards


@pytest.mark.parametrize("damage, warning", [
    (lambda f: (f / "train.bin").write_bytes((f / "train.bin").read_bytes()[: (f / "train.bin").stat().st_size // 2]),
     "train.bin has"),
    (lambda f: (f / "val.bin").write_bytes(b""), "val.bin has 0 bytes"),
    (lambda f: (f / "val.bin").write_bytes(np.full(json.loads((f / "meta.json").read_text())["tokens"]["val"], 65000,
                                                   dtype=np.uint16).tobytes()), "ids outside the vocabulary"),
    (lambda f: (f / "meta.json").write_text("{not json"), "meta.json is damaged"),
    (lambda f: (f / "meta.json").write_text('{"dtype": "object", "tokens": {"train": 1, "val": 1}}'),
     "meta.json is damaged"),
    (lambda f: (f / "meta.json").unlink(), "no meta.json"),
])
def test_a_damaged_token_cache_is_rebuilt_with_a_warning(tokenized, tmp_path, capsys, damage, warning):
    corpus, tokenizer, shards = fresh_cache(tokenized, tmp_path)
    expected = {split: np.asarray(shards.tokens(split)).copy() for split in ("train", "val")}
    damage(shards.folder)
    rebuilt = build_token_shards(corpus, tokenizer, tmp_path / "cache")
    logged = capsys.readouterr().out
    assert warning in logged and "building it again" in logged
    for split in ("train", "val"):
        assert np.array_equal(np.asarray(rebuilt.tokens(split)), expected[split])


def test_a_damaged_cache_that_cannot_be_rebuilt_is_one_line_naming_the_fix(tokenized, tmp_path):
    from conftest import mount_tmpfs
    corpus, tokenizer, _, cache = tokenized
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted = mount_tmpfs(disk, "size=16m")
    try:
        shutil.copytree(cache, disk / "cache")
        shards = build_token_shards(corpus, tokenizer, disk / "cache")
        (shards.folder / "train.bin").write_bytes(b"\0\0")
        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        else:
            shards.folder.parent.chmod(0o555)
        with pytest.raises(StorageError, match=r"(read-only file system|permission denied) .*token cache.*could not "
                                               r"be rebuilt: delete it \(rm -r"):
            build_token_shards(corpus, tokenizer, disk / "cache")
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True)
        else:
            (disk / "cache" / "tokens").chmod(0o755)


def test_an_edited_cached_tokenizer_is_trained_again(tokenized, tmp_path, capsys):
    corpus, tokenizer, path, cache = tokenized
    shutil.copytree(cache, tmp_path / "cache")
    copy = tmp_path / "cache" / path.relative_to(cache)
    edited = json.loads(copy.read_text())
    edited["model"]["vocab"]["edited"] = len(edited["model"]["vocab"])
    copy.write_text(json.dumps(edited))
    again, _ = get_or_train_tokenizer(corpus, 600, tmp_path / "cache")
    assert "is not used: its sha256 differs" in capsys.readouterr().out
    assert again.to_str() == tokenizer.to_str() and copy.read_text() == tokenizer.to_str()


def test_the_token_cache_key_follows_the_tokenizer_content(tokenized, tmp_path):
    corpus, tokenizer, _, cache = tokenized
    from tokenizers import Tokenizer
    other = Tokenizer.from_str(tokenizer.to_str())
    other.add_tokens(["<|added|>"])
    assert build_token_shards(corpus, other, tmp_path).folder != build_token_shards(corpus, tokenizer, tmp_path).folder


# --------------------------------------------------------------------------- the manifest


def manifest_copy(small_corpus, tmp_path, edit):
    folder = tmp_path / "corpus"
    shutil.copytree(small_corpus, folder, ignore=shutil.ignore_patterns(".cache"))
    manifest = json.loads((folder / "manifest.json").read_text())
    result = edit(manifest, folder)
    (folder / "manifest.json").write_text(json.dumps(result if isinstance(result, list) else manifest))
    return folder


@pytest.mark.parametrize("edit, needle", [
    (lambda m, f: [m], "is not a JSON object"),
    (lambda m, f: m.update(files={"a": 1}), '"files" is missing or not a list'),
    (lambda m, f: m["files"][0].pop("split"), '"split" is None'),
    (lambda m, f: m["files"][0].update(split="test"), "\"split\" is 'test'"),
    (lambda m, f: m["files"][0].update(sha256="0" * 10), '"sha256" is not a sha256'),
    (lambda m, f: m["files"][0].update(path=None), 'has no "path"'),
    (lambda m, f: m["files"].append("KJV/43_John.txt"), "is not an object"),
    (lambda m, f: m["files"].append({**m["files"][0], "path": "/etc/passwd"}), "outside the corpus folder"),
    (lambda m, f: m["files"].append({**m["files"][0], "path": "../../etc/passwd"}), "outside the corpus folder"),
    (lambda m, f: (f / "KJV" / "43_John.txt").write_text("edited\n"), "43_John.txt has"),
    (lambda m, f: m["files"][0].pop("bytes") and (f / m["files"][0]["path"]).write_text("x"),
     "does not match its sha256"),
])
def test_a_hostile_or_damaged_manifest_is_refused(small_corpus, tmp_path, edit, needle):
    folder = manifest_copy(small_corpus, tmp_path, edit)
    with pytest.raises(UserError, match=re.escape(needle)) as err:
        load_corpus(folder)
    assert "\n" not in str(err.value)


def test_a_symlink_out_of_the_corpus_is_refused(small_corpus, tmp_path):
    folder = manifest_copy(small_corpus, tmp_path, lambda m, f: None)
    manifest = json.loads((folder / "manifest.json").read_text())
    target = folder / manifest["files"][0]["path"]
    outside = tmp_path / "outside.txt"
    shutil.copy(target, outside)
    target.unlink()
    target.symlink_to(outside)
    with pytest.raises(UserError, match="outside the corpus folder"):
        load_corpus(folder)


def test_a_prepared_corpus_without_its_manifest_is_refused_with_the_fix(small_corpus, tmp_path):
    folder = manifest_copy(small_corpus, tmp_path, lambda m, f: None)
    (folder / "manifest.json").unlink()
    with pytest.raises(UserError, match=r"built by prepare.py \(it has verses.jsonl\).*held-out books .*prepare.py "
                                        r"--output_dir"):
        load_corpus(folder)
    (folder / "verses.jsonl").unlink()
    with pytest.raises(UserError, match="book files such as"):
        load_corpus(folder)


def test_a_folder_of_ones_own_text_needs_no_manifest_and_says_what_is_held_out(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("".join(f"line {i}\n" for i in range(40)))
    corpus = load_corpus(tmp_path, announce=True)
    assert len(list(corpus.documents("val"))) == 1
    assert "has no manifest.json: the last 5% of the lines of each of its 1 file(s) is held out" in \
        capsys.readouterr().out
