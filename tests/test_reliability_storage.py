"""The fault suite, storage: full disks (checkpoints, small writes, the token cache, the
orchestrator's summary, archives and the Llama export), dead processes' staging files, folders that
cannot be written (RELIABILITY.md lists what each proves)."""
import os
import re
import subprocess
import sys

import pytest
import torch

from mvlm_engine import fileio
from mvlm_engine.errors import StorageError
from mvlm_engine.fileio import atomic_write_text, folder_problem, remove_dead_staging
from mvlm_engine.shards import build_token_shards
from helpers.reliability import load, save, small_disk_free, tiny_training_state


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


# --------------------------------------------------------------------------- the orchestrator and the exports


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
    assert "stage 'gpt2' failed" in lines[0]
    assert "training_summary.json not updated: no space left on device" in lines[0]


def test_packaging_and_the_llama_export_on_a_full_disk_are_one_line_and_leave_nothing(small_disk, tmp_path,
                                                                                       monkeypatch):
    from mvlm_engine.packaging import package_model, write_model_manifest
    from simone_transformer import SimOneConfig, SimOneModel
    from simone_transformer.enhanced_model import LLAMA_VALUES
    from simone_transformer.hf_model import save_pretrained_dir
    from helpers.battery import load_script
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
