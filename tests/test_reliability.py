"""The fault suite, in process: full disks, damaged caches and checkpoints, hostile manifests,
concurrent writers, prompt stops, non-finite weights (RELIABILITY.md lists what each proves)."""
import ast
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO
from mvlm_engine import fileio
from mvlm_engine.checkpoint import load_checkpoint, save_checkpoint, step_checkpoints
from mvlm_engine.corpus import load_corpus
from mvlm_engine.errors import SignalStop, StorageError, TrainingDiverged, TrainingInterrupted, UserError
from mvlm_engine.evaluation import EvaluationStopped, evaluate
from mvlm_engine.fileio import atomic_write_text, folder_problem, remove_dead_staging
from mvlm_engine.guard import StepGuard
from mvlm_engine.locks import lock_folder, wait_for_lock
from mvlm_engine.runtime import Runtime
from mvlm_engine.shards import build_token_shards
from mvlm_engine.stopping import STOP
from mvlm_engine.tokenizer import get_or_train_tokenizer, train_in_child

CPU = Runtime(0, 0, 1, torch.device("cpu"), "fp32", False)


# --------------------------------------------------------------------------- helpers


def tiny_training_state(width=64):
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))
    optimizer = torch.optim.AdamW(module.parameters(), lr=1e-2)
    module(torch.randn(3, width)).sum().backward()
    optimizer.step()
    return module, optimizer


def state_for(step):
    return {"step": step, "best_val_loss": 1.5, "bad_steps": 0, "data": {"epoch": 0, "position": 8},
            "tokenizer_hash": "abc"}


def save(folder, module, optimizer, step=10):
    return save_checkpoint(folder, module, optimizer, None, state_for(step), {"k": 1})


def load(folder, module, optimizer):
    return load_checkpoint(folder, module, optimizer, None, "abc")


def hold_lock_in_child(folder: Path, purpose="training by a test") -> subprocess.Popen:
    """Another process holding `folder`'s lock until it is killed."""
    code = ("import sys, time; from mvlm_engine.locks import lock_folder; "
            f"lock = lock_folder(sys.argv[1], {purpose!r}); print('held', flush=True); time.sleep(600)")
    child = subprocess.Popen([sys.executable, "-c", code, str(folder)], stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "held"
    return child


@pytest.fixture(scope="module")
def tokenized(small_corpus, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    corpus = load_corpus(small_corpus)
    tokenizer, path = get_or_train_tokenizer(corpus, 600, cache)
    return corpus, tokenizer, path, cache


# --------------------------------------------------------------------------- storage


def test_checkpoint_on_a_full_disk_is_one_line_and_keeps_the_earlier_one(small_disk, monkeypatch):
    module, optimizer = tiny_training_state(256)  # about 0.8 MB a checkpoint
    root = small_disk / "checkpoints"
    save(root / "step_000010", module, optimizer)
    (small_disk / "filler").write_bytes(b"\0" * (small_disk_free(small_disk) - 300_000))
    with pytest.raises(StorageError, match=r"no space left on device for checkpoint step_000020 .*MB needed, "
                                           r".*MB free.*step_000010"):
        save(root / "step_000020", module, optimizer, step=20)
    # Past the estimate (it can be wrong): the write itself fails, as torch and safetensors report it.
    monkeypatch.setattr("mvlm_engine.checkpoint.ensure_free_space", lambda *a, **k: None)
    with pytest.raises(StorageError, match=r"^no space left on device writing checkpoint .*\.tmp-step_000020.*MB free"):
        save(root / "step_000020", module, optimizer, step=20)
    assert [p.name for p in root.iterdir()] == ["step_000010"]  # no staging folder left, space given back
    (small_disk / "filler").unlink()
    assert load(root / "step_000010", *tiny_training_state(256))["step"] == 10  # intact


def small_disk_free(disk):
    return shutil.disk_usage(disk).free


def test_full_disk_during_a_small_write_keeps_the_old_file(small_disk):
    target = small_disk / "summary.json"
    target.write_text("old")
    (small_disk / "filler").write_bytes(b"\0" * small_disk_free(small_disk))
    with pytest.raises(StorageError, match=f"no space left on device writing {re.escape(str(target))}"):
        atomic_write_text(target, "x" * 100_000)
    assert target.read_text() == "old" and sorted(p.name for p in small_disk.iterdir()) == ["filler", "summary.json"]


def test_torch_write_failures_without_an_errno_are_named_too(tmp_path, monkeypatch):
    """What torch raised on a full disk in the field: a RuntimeError with no errno in it."""
    module, optimizer = tiny_training_state()

    def full(*_, **__):
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 8448 vs 8339")
    monkeypatch.setattr(torch, "save", full)
    monkeypatch.setattr("mvlm_engine.checkpoint.ensure_free_space", lambda *a, **k: None)
    monkeypatch.setattr(fileio, "free_bytes", lambda path: 1000)
    with pytest.raises(StorageError, match="no space left on device writing checkpoint"):
        save(tmp_path / "step_000010", module, optimizer)
    assert not list(tmp_path.iterdir())


def test_token_cache_on_a_full_disk_leaves_no_staging(tokenized, small_disk, monkeypatch):
    corpus, tokenizer, _, _ = tokenized
    (small_disk / "filler").write_bytes(b"\0" * (small_disk_free(small_disk) - 100_000))
    with pytest.raises(StorageError, match="no space left on device for the token cache .*MB needed"):
        build_token_shards(corpus, tokenizer, small_disk)  # the estimate refuses before writing
    monkeypatch.setattr("mvlm_engine.shards.ensure_free_space", lambda *a, **k: None)
    with pytest.raises(StorageError, match="no space left on device writing the token cache"):
        build_token_shards(corpus, tokenizer, small_disk)  # the write itself fails
    assert [p.name for p in (small_disk / "tokens").iterdir() if not p.name.endswith(".lock")] == []


def test_dead_processes_staging_is_removed_and_a_live_ones_kept(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)
    (tmp_path / f"abc.{dead_pid}@{fileio.HOST}.tmp").mkdir()
    (tmp_path / f".meta.json.{dead_pid}@{fileio.HOST}.tmp").write_text("x")
    (tmp_path / f"abc.{os.getpid()}@{fileio.HOST}.tmp").mkdir()  # alive: this process
    (tmp_path / f"abc.{dead_pid}@another-host.tmp").mkdir()  # not ours to judge
    removed = remove_dead_staging(tmp_path)
    assert len(removed) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"abc.{os.getpid()}@{fileio.HOST}.tmp", f"abc.{dead_pid}@another-host.tmp"])


def test_unwritable_folders_are_named_before_any_work(tmp_path, read_only_corpus):
    (tmp_path / "file").write_text("")
    assert "is a file" in folder_problem(tmp_path / "file", "--output_dir")
    assert "which is a file" in folder_problem(tmp_path / "file" / "sub", "--output_dir")
    assert "cannot be written" in folder_problem(read_only_corpus / "empty" / "new", "--cache_dir")
    assert folder_problem(tmp_path / "new" / "deeper", "--output_dir") is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file"]  # the probe leaves nothing


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("rng"), "'rng' is missing"),
    (lambda s: s.pop("data"), "'data' is missing"),
    (lambda s: s.update(step="10"), "'step' is not an int"),
    (lambda s: s.update(step=11), "changed after the checkpoint was written"),
    (lambda s: s.update(best_val_loss=None), "'best_val_loss' is not a float"),
])
def test_damaged_or_edited_trainer_state_is_refused(tmp_path, edit, needle):
    module, optimizer = tiny_training_state()
    folder = save(tmp_path / "best_model", module, optimizer)
    state = json.loads((folder / "trainer_state.json").read_text())
    edit(state)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=re.escape(needle)) as err:
        load(folder, *tiny_training_state())
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"[1, 2]", b"\xff\xfe", b'{"step": 10}'])
def test_unreadable_trainer_state_is_one_line(tmp_path, content):
    folder = save(tmp_path / "step_000010", *tiny_training_state())
    (folder / "trainer_state.json").write_bytes(content)
    with pytest.raises(UserError, match="trainer_state.json is (unreadable|damaged)"):
        load(folder, *tiny_training_state())


def test_a_step_that_does_not_match_its_folder_is_refused(tmp_path):
    folder = save(tmp_path / "step_000010", *tiny_training_state())
    moved = folder.rename(tmp_path / "step_000012")
    with pytest.raises(UserError, match="'step' is 10 in the folder of step 12"):
        load(moved, *tiny_training_state())


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PAYLOAD_MARKER}",))


PAYLOAD_MARKER = Path("/tmp") / f"mvlm-unpickled-{os.getpid()}"


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pt"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, name):
    folder = save(tmp_path / "step_000010", *tiny_training_state())
    with open(folder / name, "wb") as handle:
        pickle.dump({"state": Payload()}, handle)
    torch.save({"state": {}, "param_groups": [], "evil": Payload()}, tmp_path / "evil.pt")
    PAYLOAD_MARKER.unlink(missing_ok=True)
    with pytest.raises(UserError, match="corrupt"):
        load(folder, *tiny_training_state())
    shutil.copy(tmp_path / "evil.pt", folder / name)  # the same payload in torch's own zip format
    with pytest.raises(UserError, match="corrupt"):
        load(folder, *tiny_training_state())
    assert not PAYLOAD_MARKER.exists()


def test_no_load_path_can_unpickle():
    """Every torch.load passes weights_only=True; nothing calls pickle, np.load(allow_pickle) or
    torch.load without it (tests excepted)."""
    offenders = []
    for path in list(REPO.glob("*.py")) + list(REPO.glob("mvlm_engine/*.py")) + list(REPO.glob("SIM-ONE Training/**/*.py")) \
            + list(REPO.glob("benchmarks/*.py")) + list(REPO.glob("mvlm_training_dataset_complete/*.py")):
        text = path.read_text(encoding="utf-8")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        for bad in ("pickle.load", "pickle.loads", "allow_pickle=True", "dill.", "joblib.load"):
            if bad in text:
                offenders.append(f"{path.name}: {bad}")
    assert not offenders, offenders


def model_loads(tree) -> list:
    """Every call that loads model weights from a folder (X.from_pretrained of a model class, a
    text-generation pipeline), in the code and in code held in strings (a child interpreter's)."""
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "from_pretrained(" in node.value:
            try:
                calls += model_loads(ast.parse(node.value))
            except SyntaxError:
                pass  # prose (a docstring, a model card's usage text), not code
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if (name.endswith("ForCausalLM.from_pretrained") or name == "pipeline") and node.args:
                calls.append(node)
    return calls


def test_every_model_load_is_safetensors_only():
    """A folder's weights never come from a pickled pytorch_model.bin: every model load in the
    repository passes use_safetensors=True (a pipeline: in its model_kwargs)."""
    offenders, seen = [], 0
    for path in list(REPO.glob("*.py")) + list(REPO.glob("mvlm_engine/*.py")) + list(REPO.glob("SIM-ONE Training/**/*.py")) \
            + list(REPO.glob("benchmarks/*.py")) + list(REPO.glob("release/*.py")):
        for call in model_loads(ast.parse(path.read_text(encoding="utf-8"))):
            seen += 1
            if "'use_safetensors': True" not in ast.unparse(call) and "use_safetensors=True" not in ast.unparse(call):
                offenders.append(f"{path.name}: {ast.unparse(call)[:120]}")
    assert seen >= 6 and not offenders, offenders


def test_optimizer_state_of_another_shape_is_refused(tmp_path):
    folder = save(tmp_path / "step_000010", *tiny_training_state(64))
    with pytest.raises(UserError, match="corrupt or does not match"):
        load(folder, *tiny_training_state(32))
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    saved["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(saved, folder / "optimizer.pt")
    with pytest.raises(UserError, match="exp_avg of parameter 0 does not fit its shape"):
        load(folder, *tiny_training_state(64))


def test_non_finite_weights_are_never_checkpointed_and_the_last_good_one_is_named(tmp_path):
    module, optimizer = tiny_training_state()
    save(tmp_path / "step_000010", module, optimizer)
    with torch.no_grad():
        module[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"1 of [\d,]+ weights are NaN .*last good checkpoint is .*step_000010"):
        save(tmp_path / "step_000020", module, optimizer, step=20)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_000010"]
    assert not list(tmp_path.glob(".tmp-*"))


# --------------------------------------------------------------------------- finite weights


def test_step_guard_puts_back_parameters_and_optimizer_state_exactly():
    module, optimizer = tiny_training_state()
    guard = StepGuard(module, optimizer)
    before = [t.clone() for t in guard._tensors()]
    guard.save()
    module(torch.randn(3, 64)).sum().backward()
    optimizer.param_groups[0]["lr"] = float("inf")
    optimizer.step()
    assert not bool(guard.weights_finite(torch.device("cpu")))
    guard.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, guard._tensors()))
    assert bool(guard.weights_finite(torch.device("cpu")))
    fresh = torch.nn.Linear(4, 4)  # the first step creates the state; undoing it removes it again
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    first = StepGuard(fresh, fresh_optimizer)
    first.save()
    fresh(torch.randn(2, 4)).sum().backward()
    fresh_optimizer.step()
    first.restore()
    assert not fresh_optimizer.state


def muon_training_state(optimizer="muon"):
    """A module with Muon on its matrices and AdamW on its biases (an OptimizerSet), one step taken."""
    from mvlm_engine.config import TrainConfig
    from mvlm_engine.optim import build_optimizer
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    optimizer = build_optimizer(module, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    module(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return module, optimizer


def test_the_guard_and_checkpoints_cover_each_optimizer_of_a_muon_set(tmp_path):
    module, optimizer = muon_training_state()
    guard = StepGuard(module, optimizer)
    before = [t.clone() for t in guard._tensors()]
    assert len(before) == 4 + 2 + 2 * 3  # 4 parameters, Muon's 2 momenta, AdamW's step and moments of 2 biases
    guard.save()
    module(torch.randn(4, 8)).sum().backward()
    for group in optimizer.param_groups:
        group["lr"] = float("inf")
    optimizer.step()
    assert not bool(guard.weights_finite(torch.device("cpu")))
    guard.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, guard._tensors()))
    folder = save(tmp_path / "step_000010", module, optimizer)
    load(folder, *muon_training_state())
    with pytest.raises(UserError, match="optimizer.pt was saved by another --optimizer"):
        load(folder, *muon_training_state("adamw"))


def test_a_step_that_makes_a_weight_non_finite_is_skipped(small_corpus, tmp_path, monkeypatch, capsys):
    from test_engine import run
    real_step, calls = torch.optim.AdamW.step, []

    def poisoned_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) in (3, 4):  # as a huge update would: one weight overflows
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    objective, summary, history = run(small_corpus, tmp_path, bad_calls=set())
    assert summary["status"] == "complete" and torch.isfinite(objective.table.weight).all()
    assert [r["step"] for r in history["train"]] == [1, 2, 5, 6, 7, 8, 9, 10, 11, 12]
    assert "step 2: the update made weights non-finite, step skipped (1/3)" in capsys.readouterr().out


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
    (lambda m, f: m["files"][0].pop("bytes") and (f / m["files"][0]["path"]).write_text("x"), "does not match its sha256"),
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


# --------------------------------------------------------------------------- one writer per folder


def test_a_second_writer_is_refused_with_the_holders_pid(tmp_path):
    child = hold_lock_in_child(tmp_path / "run")
    try:
        with pytest.raises(UserError, match=rf"in use by training by a test \(PID {child.pid}.*kill {child.pid}"):
            lock_folder(tmp_path / "run", "another trainer")
    finally:
        child.kill()
        child.wait()


def test_a_dead_processes_lock_is_taken_over(tmp_path, capsys):
    child = hold_lock_in_child(tmp_path / "run")
    child.kill()  # kill -9: the lock file stays, with the dead PID in it
    child.wait()
    assert str(child.pid) in (tmp_path / "run" / ".lock").read_text()
    lock = lock_folder(tmp_path / "run", "a trainer")
    logged = capsys.readouterr().out
    assert f"PID {child.pid}" in logged and "no longer running" in logged
    assert json.loads((tmp_path / "run" / ".lock").read_text())["pid"] == os.getpid()
    lock.release()


def test_waiting_for_a_cache_build_ends_on_a_stop_request(tmp_path):
    child = hold_lock_in_child(tmp_path / "cache")
    try:
        with STOP.deferred():
            os.kill(os.getpid(), signal.SIGTERM)
            with pytest.raises(TrainingInterrupted, match="while waiting for training by a test") as stop:
                wait_for_lock(tmp_path / "cache" / ".lock", "a build")
        assert stop.value.exit_code == 143
        assert child.poll() is None  # the holder still holds it: the stop, not the lock, ended the wait
    finally:
        child.kill()
        child.wait()


# --------------------------------------------------------------------------- prompt stops


def test_evaluation_stops_between_batches(tokenized):
    corpus, tokenizer, _, cache = tokenized
    shards = build_token_shards(corpus, tokenizer, cache)
    table = torch.nn.Embedding(tokenizer.get_vocab_size(), tokenizer.get_vocab_size())
    asked = []

    def should_stop():
        asked.append(1)
        return len(asked) >= 2
    with pytest.raises(EvaluationStopped):
        evaluate(table, lambda m, x: m(x), shards.tokens("val"), 16, 400, 4, CPU,
                 torch.ones(tokenizer.get_vocab_size()), should_stop=should_stop)
    assert len(asked) == 2 and table.training  # stopped after two batches, the module's mode restored


def test_tokenizer_training_is_abandoned_at_once_on_a_stop(tokenized, tmp_path, monkeypatch):
    import mvlm_engine.tokenizer
    corpus = tokenized[0]
    out = tmp_path / ".tokenizer.json.1@x.tmp"
    children, real_popen = [], subprocess.Popen
    monkeypatch.setattr(mvlm_engine.tokenizer.subprocess, "Popen",
                        lambda *a, **k: children.append(real_popen(*a, **k)) or children[-1])
    with STOP.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        with pytest.raises(TrainingInterrupted, match="while training the tokenizer; nothing was saved"):
            train_in_child(corpus, 20000, (), out)
    assert [c.returncode for c in children] == [-signal.SIGKILL]  # killed mid-training, not finished
    assert list(tmp_path.iterdir()) == []  # the child's output and spec are gone


def test_a_cache_build_stops_between_batches_and_leaves_nothing(tokenized, tmp_path):
    corpus, tokenizer, _, _ = tokenized
    with STOP.deferred():
        os.kill(os.getpid(), signal.SIGINT)
        with pytest.raises(TrainingInterrupted, match="while building the token cache") as stop:
            build_token_shards(corpus, tokenizer, tmp_path)
    assert stop.value.exit_code == 130
    assert [p.name for p in (tmp_path / "tokens").iterdir() if not p.name.endswith(".lock")] == []


def test_a_repeated_signal_is_a_request_not_a_traceback(capfd):
    with STOP.deferred():
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGTERM)
        assert STOP.signum == signal.SIGTERM  # the first one decides the exit status
        with pytest.raises(TrainingInterrupted) as stop:
            STOP.check("testing")
    assert stop.value.exit_code == 143
    assert "still stopping at the next safe point" in capfd.readouterr().out


def test_a_repeat_while_a_stop_is_on_its_way_out_changes_nothing(capfd):
    from mvlm_engine.cli import run_cli

    def main(argv):
        try:
            with STOP.deferred():
                os.kill(os.getpid(), signal.SIGTERM)
                STOP.check("testing", "the test's checkpoint was saved")
        finally:  # past the deferred region: the stop's exception is on its way out
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
    try:
        with pytest.raises(SystemExit) as exit_:
            run_cli("test", main, [])
        os.kill(os.getpid(), signal.SIGINT)  # after run_cli, on the process's way out
        time.sleep(0.2)
        assert signal.getsignal(signal.SIGINT) == STOP._handle  # kept until the process ends
    finally:
        STOP.uninstall()
    assert exit_.value.code == 143
    captured = capfd.readouterr()
    assert captured.err.strip() == "test: stopped by SIGTERM while testing; the test's checkpoint was saved"
    assert captured.out.count("SIGINT again: already stopping") == 2


def test_outside_deferred_work_a_signal_stops_at_once():
    installed = STOP.install()
    try:
        with pytest.raises(SignalStop) as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(1)
        assert stop.value.exit_code == 130
    finally:
        if installed:
            STOP.uninstall()


# --------------------------------------------------------------------------- the orchestrator


def test_a_full_disk_in_the_orchestrators_summary_keeps_the_stage_failed_line(small_corpus, small_disk, capsys,
                                                                            monkeypatch):
    import train_all_models
    from mvlm_engine.cli import run_cli

    def failing_stage(name, command, log_path):
        (small_disk / "filler").write_bytes(b"\0" * small_disk_free(small_disk))  # the trainer filled the disk
        raise train_all_models.StageFailed(name, f"stage '{name}' failed with exit status 1; see {log_path}")
    monkeypatch.setattr(train_all_models, "run_stage", failing_stage)
    with pytest.raises(SystemExit) as exit_status:
        run_cli("train_all_models.py", train_all_models.main,
                ["--data_dir", str(small_corpus), "--models_dir", str(small_disk / "models"), "--logs_dir",
                 str(small_disk / "logs"), "--download_dir", str(small_disk / "downloads"), "--preset", "tiny"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit_status.value.code == 1 and len(lines) == 1
    assert "stage 'gpt2' failed" in lines[0] and "training_summary.json not updated: no space left on device" in lines[0]


@pytest.mark.parametrize("script", ["mvlm_trainer.py", "enhanced_train.py"])
def test_every_kind_of_second_trainer_is_refused_with_the_holders_pid(script, small_corpus, tmp_path):
    from test_bad_inputs import load_script
    trainer = load_script(script)
    out = tmp_path / "run"
    save(out / "checkpoints" / "step_000010", *tiny_training_state())
    child = hold_lock_in_child(out, "mvlm_trainer.py training")
    try:
        for extra in ([], ["--resume_from", "latest"], ["--overwrite"]):
            with pytest.raises(UserError, match=rf"in use by mvlm_trainer.py training \(PID {child.pid}"):
                trainer.setup(["--data_dir", str(small_corpus), "--output_dir", str(out), *extra])
    finally:
        child.kill()
        child.wait()


def test_validation_refuses_a_folder_whose_training_runs(small_corpus, tmp_path):
    from test_bad_inputs import load_script
    validate = load_script("validate_models.py")
    (tmp_path / "models" / "run").mkdir(parents=True)
    child = hold_lock_in_child(tmp_path / "models" / "run", "mvlm_trainer.py training")
    try:
        with pytest.raises(UserError, match=rf"run is in use by mvlm_trainer.py training \(PID {child.pid}"):
            validate.main(["--models_dir", str(tmp_path / "models"), "--names", "run", "--data_dir", str(small_corpus)])
    finally:
        child.kill()
        child.wait()


def test_packaging_and_the_llama_export_on_a_full_disk_are_one_line_and_leave_nothing(small_disk, tmp_path,
                                                                                       monkeypatch):
    from mvlm_engine.packaging import package_model, write_model_manifest
    from simone_transformer import SimOneConfig, SimOneModel
    from simone_transformer.enhanced_model import LLAMA_VALUES
    from simone_transformer.hf_model import save_pretrained_dir
    from test_bad_inputs import load_script
    model_dir = tmp_path / "plain"
    config = SimOneConfig(vocab_size=512, d_model=64, n_layers=2, n_heads=4, max_seq_len=64, **LLAMA_VALUES)
    save_pretrained_dir(SimOneModel(config), model_dir)
    (model_dir / "padding.bin").write_bytes(os.urandom(5_000_000))  # does not compress: more than the disk holds
    write_model_manifest(model_dir)
    with pytest.raises(StorageError, match="no space left on device for the archive plain.tar.gz"):
        package_model(model_dir, small_disk / "downloads" / "plain.tar.gz")
    monkeypatch.setattr("mvlm_engine.packaging.ensure_free_space", lambda *a, **k: None)
    (small_disk / "filler").write_bytes(b"\0" * (small_disk_free(small_disk) - 200_000))
    with pytest.raises(StorageError, match="no space left on device writing .*plain.tar.gz"):
        package_model(model_dir, small_disk / "downloads" / "plain.tar.gz")
    assert list((small_disk / "downloads").iterdir()) == []
    (model_dir / "padding.bin").unlink()
    export = load_script("export_llama.py")
    monkeypatch.setattr(export, "ensure_free_space", lambda *a, **k: None)
    (small_disk / "filler").unlink()
    (small_disk / "filler").write_bytes(b"\0" * (small_disk_free(small_disk) - 50_000))
    with pytest.raises(StorageError, match="no space left on device writing the export"):
        export.export(model_dir, small_disk / "llama")
    assert sorted(p.name for p in small_disk.iterdir()) == ["downloads", "filler"]


def test_the_orchestrator_never_replaces_a_finished_model_it_cannot_place(tmp_path):
    from train_all_models import training_state
    out = tmp_path / "mvlm_gpt2"
    out.mkdir()
    assert training_state(out, "tiny") == "fresh"
    (out / "model.safetensors").write_bytes(b"weights")
    with pytest.raises(UserError, match="holds a model but no run_summary.json or checkpoints"):
        training_state(out, "tiny")
    (out / "run_summary.json").write_text("{}")
    (out / "train_config.json").write_text("{not json")
    with pytest.raises(UserError, match="holds a finished 'None' run, not 'tiny'; pass --retrain"):
        training_state(out, "tiny")
    (out / "train_config.json").write_text('{"preset": "tiny"}')
    assert training_state(out, "tiny") == "done"
    (out / "run_summary.json").unlink()
    save(out / "checkpoints" / "step_000010", *tiny_training_state())
    assert training_state(out, "tiny") == "resume"
