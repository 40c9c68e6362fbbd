"""The bad-input battery: every CLI, fed nonexistent, read-only and file-instead-of-folder paths;
zero, negative, NaN, inf, huge and wrong-type numbers; damaged config, checkpoint, model and
corpus files. Each must end with a non-zero exit, exactly one line on stderr, no traceback and
no file changed (a folder's .lock record aside).

The cases run in process, through each script's own main() and cli.run_cli (the code path of
the real entry point, without paying a Python start per case); one subprocess per CLI then
checks the real entry points themselves.
"""
import json
import lzma
import shutil
import signal
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import assert_one_line_error, run_script
from mvlm_engine.averaging import AVERAGE_FILE
from mvlm_engine.cli import run_cli
from helpers.battery import CASES, SCRIPTS, load_script

pytestmark = pytest.mark.e2e  # it trains the shared tiny models it damages


def snapshot(*roots: Path) -> dict:
    """Every file and folder under `roots` with its size and modification time (.lock records aside)."""
    state = {}
    for root in roots:
        for path in [root, *root.rglob("*")]:
            if path.name != ".lock" and not path.is_symlink():  # a folder's own time changes with its .lock
                stat = path.stat()
                state[str(path)] = (0, 0) if path.is_dir() else (stat.st_size, stat.st_mtime_ns)
    return state


# --------------------------------------------------------------------------- the damaged material


def damaged_checkpoint(ws: Path, trained: Path, name: str, step: str, damage) -> Path:
    """A run folder holding only a copy of `trained`'s checkpoint `step`, damaged by `damage(folder)`."""
    out = ws / "runs" / name
    shutil.copytree(trained / "checkpoints" / step, out / "checkpoints" / step)
    damage(out / "checkpoints" / step)
    return out


def drop_weights_metadata(folder: Path) -> None:
    """As a checkpoint of an older version: no step or trainer-state hash in model.safetensors."""
    save_file(load_file(folder / "model.safetensors"), folder / "model.safetensors", metadata={"format": "pt"})


def without_data_and_average(state: dict) -> dict:
    return {**{k: v for k, v in state.items() if k != "average"}, "data": {}}


def edit_json(path: Path, edit) -> None:
    value = json.loads(path.read_text())
    result = edit(value)
    path.write_text(json.dumps(value if result is None else result))


CHECKPOINT_DAMAGE = {
    "state_no_rng": lambda f: edit_json(f / "trainer_state.json", lambda s: s.pop("rng")),
    "state_edited_step": lambda f: edit_json(f / "trainer_state.json", lambda s: s.update(step=149)),
    "state_list": lambda f: (f / "trainer_state.json").write_text("[]"),
    "state_binary": lambda f: (f / "trainer_state.json").write_bytes(b"\x89PNG\x00\xff"),
    # a checkpoint from before the data position, the weights' metadata and the weight average were saved
    "old_checkpoint_data_gone": lambda f: (edit_json(f / "trainer_state.json", without_data_and_average),
                                           drop_weights_metadata(f), (f / AVERAGE_FILE).unlink(missing_ok=True)),
    "weights_truncated": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:999]),
    "optimizer_garbage": lambda f: (f / "optimizer.pt").write_bytes(b"not a torch file"),
    "rng_garbage": lambda f: torch.save({"torch": torch.zeros(3)}, f / "rng_state.pt"),
    "optimizer_missing": lambda f: (f / "optimizer.pt").unlink(),
    "intact": lambda f: None,  # resumed with settings that do not fit it
}


def model_variant(ws: Path, source: Path, name: str, damage) -> Path:
    """A copy of a finished model folder's files (no checkpoints), damaged by `damage(folder)`."""
    folder = ws / "models" / name
    folder.mkdir(parents=True)
    for path in source.iterdir():
        if path.is_file() and path.name != ".lock":
            shutil.copy2(path, folder / path.name)
    damage(folder)
    return folder


def nan_weights(folder: Path) -> None:
    weights = load_file(folder / "model.safetensors")
    first = next(iter(weights))
    weights[first] = weights[first].clone()
    weights[first].view(-1)[0] = float("nan")
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})


MODEL_DAMAGE = {
    "good": lambda f: None,
    "truncated": lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:5000]),
    "garbage": lambda f: (f / "model.safetensors").write_bytes(b"\x00" * 64),
    "config_list": lambda f: (f / "config.json").write_text("[1, 2]"),
    "config_garbage": lambda f: (f / "config.json").write_bytes(b"\xff\xfe{"),
    "nan": nan_weights,
}


def verses_variants(ws: Path, corpus: Path) -> SimpleNamespace:
    folders = {}
    for name in ("garbage", "bad_record", "bad_number", "unknown_book", "bad_manifest", "bad_xz"):
        folder = ws / "verses" / name
        folder.mkdir(parents=True)
        shutil.copy(corpus / "manifest.json", folder / "manifest.json")
        lines = (corpus / "verses.jsonl").read_text().splitlines()[:50]
        record = json.loads(lines[3])
        if name == "garbage":
            lines[3] = "{not json"
        elif name == "bad_record":
            lines[3] = json.dumps({"translation": "KJV"})
        elif name == "bad_number":
            lines[3] = json.dumps({**record, "chapter": -1})
        elif name == "unknown_book":
            lines[3] = json.dumps({**record, "book": "Hezekiah"})
        elif name == "bad_manifest":
            (folder / "manifest.json").write_text('{"translations": 5}')
        (folder / "verses.jsonl").write_text("\n".join(lines) + "\n")
        if name == "bad_xz":
            (folder / "verses.jsonl.xz").write_bytes(lzma.compress(b"x" * 100)[:40])
        folders[name] = folder / ("verses.jsonl.xz" if name == "bad_xz" else "verses.jsonl")
    return SimpleNamespace(**folders)


def config_files(ws: Path) -> SimpleNamespace:
    folder = ws / "configs"
    folder.mkdir()
    files = {"list": "[1]", "types": '{"batch_size": "16", "learning_rate": true}', "nan": '{"learning_rate": NaN}',
             "huge": '{"block_size": 100000000}', "action": '{"overwrite": true}', "unknown": '{"batchsize": 3}',
             "nested": '{"model": {"n_layer": -1}}', "truncated": '{"batch_size": 1'}
    for name, text in files.items():
        (folder / f"{name}.json").write_text(text)
    (folder / "binary.json").write_bytes(bytes(range(256)))
    return SimpleNamespace(**{k: folder / f"{k}.json" for k in [*files, "binary"]}, folder=folder,
                           missing=folder / "missing.json")


@pytest.fixture(scope="module")
def ws(small_corpus, trained_gpt2, trained_simone, read_only_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("battery")
    (root / "file").write_text("keep me")
    runs = root / "runs"
    shutil.copytree(trained_gpt2, runs / "with_checkpoints", ignore=shutil.ignore_patterns(".lock"))
    shutil.copytree(trained_gpt2, runs / "finished", ignore=shutil.ignore_patterns("checkpoints", ".lock"))
    damaged = {name: damaged_checkpoint(root, trained_gpt2, name, "step_000150", damage)
               for name, damage in CHECKPOINT_DAMAGE.items() if name != "intact"}
    simone_damaged = {name: damaged_checkpoint(root, trained_simone, f"simone_{name}", "step_000080", damage)
                      for name, damage in CHECKPOINT_DAMAGE.items()
                      if name in ("state_no_rng", "optimizer_garbage", "intact")}
    models = {name: model_variant(root, trained_simone, f"simone_{name}", damage)
              for name, damage in MODEL_DAMAGE.items()}
    models["gpt2"] = model_variant(root, trained_gpt2, "mvlm_gpt2", lambda f: None)
    models["gpt2_nan"] = model_variant(root, trained_gpt2, "gpt2_nan", nan_weights)
    models["gpt2_truncated"] = model_variant(root, trained_gpt2, "gpt2_truncated", MODEL_DAMAGE["truncated"])
    (root / "not_empty").mkdir()
    (root / "not_empty" / "x").write_text("")
    return SimpleNamespace(root=root, corpus=small_corpus, file=root / "file", missing=root / "nowhere",
                           under_file=root / "file" / "sub", ro=read_only_corpus, runs=runs, damaged=damaged,
                           simone_damaged=simone_damaged, models=models, verses=verses_variants(root, small_corpus),
                           configs=config_files(root), not_empty=root / "not_empty")


# ---------------------------------------------------------------- the battery (its cases: tests/helpers/battery.py)


@pytest.fixture(scope="module")
def mains():
    return {}


@pytest.mark.parametrize("cli, name, argv, needle", CASES, ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_bad_input_is_one_line_and_changes_nothing(cli, name, argv, needle, ws, mains, capsys):
    if cli not in mains:
        mains[cli] = load_script(cli)
    module = mains[cli]
    arguments = argv(ws)
    before = snapshot(ws.root, ws.corpus)
    handler = signal.getsignal(signal.SIGTERM)
    try:
        with pytest.raises(SystemExit) as exit_status:
            run_cli(getattr(module, "PROG", cli), module.main, arguments)
    finally:
        signal.signal(signal.SIGTERM, handler)  # the orchestrator's main installs its own
    stderr = capsys.readouterr().err
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert exit_status.value.code not in (0, None), stderr
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    assert needle in lines[0], lines[0]
    assert snapshot(ws.root, ws.corpus) == before


@pytest.mark.parametrize("cli, argv, needle", [
    ("mvlm_trainer.py", ["--learning_rate", "1e30", "--seed", "-1"], "--learning_rate must be <= 1"),
    ("enhanced_train.py", ["--memory_tokens", "1e9"], "invalid int value"),
    ("train.py", ["--z_loss_weight", "inf"], "--z_loss_weight must be a finite number"),
    ("train_all_models.py", ["--trainer_args", "'unbalanced"], "No closing quotation"),
    ("validate_models.py", ["--recall_verses", "0"], "--recall_verses must be > 0"),
    ("prepare.py", ["--from_verses", "/nonexistent/verses.jsonl"], "--from_verses needs"),
    ("export_llama.py", ["--model_dir", "/nonexistent", "--output_dir", "/tmp/x"], "is not a directory"),
    ("export_gguf.py", ["--model_dir", "/nonexistent", "--output", "/tmp/x.gguf"], "is not a directory"),
    ("release.package", ["--models_dir", "/nonexistent"], "is not a folder"),
])
def test_each_real_entry_point_answers_in_one_line(cli, argv, needle, tmp_path):
    if cli == "release.package":
        proc = run_script("-m", "release.package", *argv, cwd=tmp_path)
    else:
        proc = run_script(SCRIPTS[cli], *argv, cwd=tmp_path)
    assert_one_line_error(proc, needle)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("damage", ["[1, 2]", "{\"model_type\": \"gpt2\"", "\xff"])
def test_validation_of_a_model_with_a_garbled_config_is_a_failed_check_in_one_line(damage, ws, mains, tmp_path, capsys):
    """Even when the manifest was rewritten to match it, a garbled config.json fails the loading check."""
    from mvlm_engine.packaging import write_model_manifest
    shutil.copytree(ws.models["gpt2"], tmp_path / "models" / "mvlm_gpt2")
    (tmp_path / "models" / "mvlm_gpt2" / "config.json").write_text(damage, encoding="latin-1")
    write_model_manifest(tmp_path / "models" / "mvlm_gpt2")
    validate = mains.setdefault("validate_models.py", load_script("validate_models.py"))
    with pytest.raises(SystemExit) as exit_status:
        run_cli("validate_models.py", validate.main, ["--models_dir", str(tmp_path / "models"), "--data_dir",
                                                      str(ws.corpus), "--no_archives"])
    stderr = capsys.readouterr().err
    assert exit_status.value.code == 1 and "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1
    assert "FAILED loading (mvlm_gpt2): " in stderr and "cannot be loaded" in stderr
