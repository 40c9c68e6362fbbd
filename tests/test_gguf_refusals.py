"""export_gguf.py's refusals: governance-on SIM-ONE and bad input are refused in one line, exit
status 2, with nothing written; full disks and failed writes are one line, exit 1, and leave no
temporary file. In-process on random-weight folders (the `gguf` package; seconds), and the command
line once on really trained models (e2e)."""
import json
import os
import shutil

import pytest

from conftest import assert_one_line_error, run_ok, run_script, save_simone

gguf = pytest.importorskip("gguf")

from helpers.gguf_files import EXPORT, export, export_ok, run_main  # noqa: E402


@pytest.mark.parametrize("overrides, needles", [
    (dict(policy_gate=True), ["policy_gate"]),
    (dict(memory_tokens=2), ["memory_tokens=2"]),
    (dict(policy_gate=True, memory_tokens=3), ["policy_gate", "memory_tokens=3"]),
])
def test_governance_on_is_refused_in_one_line(tokenizer_file, tmp_path, capsys, overrides, needles):
    model_dir = save_simone(tokenizer_file, tmp_path / "governed", **overrides)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = export(capsys, model_dir, out_dir / "governed.gguf")
    assert proc.returncode == 2
    assert_one_line_error(proc, "governance", *needles)
    assert list(out_dir.iterdir()) == []


def test_switch_missing_from_config_counts_as_on(tokenizer_file, tmp_path, capsys):
    """SIM-ONE's defaults have governance on: a config.json without the switches is no Llama."""
    model_dir = save_simone(tokenizer_file, tmp_path / "old")
    config = json.loads((model_dir / "config.json").read_text())
    del config["policy_gate"], config["memory_tokens"]
    (model_dir / "config.json").write_text(json.dumps(config))
    proc = export(capsys, model_dir, tmp_path / "old.gguf")
    assert proc.returncode == 2
    assert_one_line_error(proc, "policy_gate", "memory_tokens=8")
    assert not (tmp_path / "old.gguf").exists()


def edit_json(path, **changes):
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


BAD_INPUTS = {
    "missing folder": (lambda d: d / "nope", None, "is not a directory"),
    "no weights": (lambda d: d, lambda d: (d / "model.safetensors").unlink(), "has no model.safetensors"),
    "garbage weights": (lambda d: d, lambda d: (d / "model.safetensors").write_bytes(b"\x07garbage" * 64),
                        "not a readable safetensors"),
    "truncated weights": (lambda d: d, lambda d: truncate(d / "model.safetensors"), "not a readable safetensors"),
    "config is a list": (lambda d: d, lambda d: (d / "config.json").write_text("[1, 2]"), "JSON list"),
    "unknown model_type": (lambda d: d, lambda d: (d / "config.json").write_text('{"model_type": "bert"}'),
                           "model_type 'bert' is not supported"),
    "zero heads": (lambda d: d, lambda d: edit_json(d / "config.json", n_head=0), "'n_head' must be positive"),
    "not a BPE tokenizer": (lambda d: d, lambda d: edit_json(d / "tokenizer.json", model={"type": "WordPiece"}),
                            "is not a BPE tokenizer"),
    "malformed tokenizer": (lambda d: d, lambda d: edit_json(d / "tokenizer.json", added_tokens=[{"content": "x"}]),
                            "tokenizer.json is malformed"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_one_line_and_writes_nothing(gpt2_dir, tmp_path, capsys, case):
    model_dir = tmp_path / "model"
    shutil.copytree(gpt2_dir, model_dir)
    pick, damage, needle = BAD_INPUTS[case]
    if damage:
        damage(model_dir)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    proc = export(capsys, pick(model_dir), out_dir / "model.gguf")
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
    assert list(out_dir.iterdir()) == []


@pytest.mark.parametrize("output, needle", [("missing_dir/model.gguf", "does not exist"),
                                            ("a_directory", "is a directory")])
def test_unwritable_output_is_one_line(gpt2_dir, tmp_path, capsys, output, needle):
    (tmp_path / "a_directory").mkdir()
    proc = export(capsys, gpt2_dir, tmp_path / output)
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_directory"]


@pytest.mark.parametrize("args, needle", [([], "required"), (["--dtype", "q4_0"], "invalid choice")])
def test_usage_errors_are_one_line(gpt2_dir, tmp_path, capsys, args, needle):
    proc = run_main(capsys, *(["--model_dir", gpt2_dir, "--output", tmp_path / "m.gguf"] if args else []), *args)
    assert proc.returncode == 2
    assert_one_line_error(proc, needle)
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_no_temporary_file(gpt2_dir, tmp_path, monkeypatch, capsys):
    """A write that fails midway (disk full, say) removes its temporary file: one line, exit 1."""
    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    proc = export(capsys, gpt2_dir, tmp_path / "model.gguf")
    assert proc.returncode == 1
    assert_one_line_error(proc, f"no space left on device writing {tmp_path / 'model.gguf'}", "MB free")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_is_refused_before_the_write(gpt2_dir, small_disk, capsys):
    (small_disk / "filler").write_bytes(b"\0" * shutil.disk_usage(small_disk).free)
    proc = export(capsys, gpt2_dir, small_disk / "model.gguf")
    assert proc.returncode == 1
    assert_one_line_error(proc, "no space left on device for the GGUF file model.gguf", "MB needed")
    assert [p.name for p in small_disk.iterdir()] == ["filler"]


def test_non_finite_weights_are_refused_naming_the_last_good_checkpoint(gpt2_dir, tmp_path, capsys):
    from safetensors.torch import load_file, save_file
    model_dir = tmp_path / "model"
    shutil.copytree(gpt2_dir, model_dir)
    (model_dir / "checkpoints" / "step_000010").mkdir(parents=True)
    weights = load_file(model_dir / "model.safetensors")
    name = next(k for k, v in weights.items() if v.is_floating_point())
    weights[name] = weights[name].clone()
    weights[name].view(-1)[:3] = float("inf")
    save_file(weights, model_dir / "model.safetensors", metadata={"format": "pt"})
    proc = export(capsys, model_dir, tmp_path / "model.gguf")
    assert proc.returncode == 2
    assert_one_line_error(proc, "holds 3 NaN or infinite weights, so it was not exported",
                          f"the last good checkpoint is {model_dir / 'checkpoints' / 'step_000010'}")
    assert not (tmp_path / "model.gguf").exists()


def test_a_dead_exports_temporary_file_is_removed_and_a_live_ones_kept(gpt2_dir, tmp_path):
    import subprocess
    from mvlm_engine.fileio import HOST
    dead = subprocess.Popen(["true"])
    dead.wait()
    left = [tmp_path / f".model.gguf.{pid}@{HOST}.tmp" for pid in (dead.pid, os.getppid())]
    for path in left:
        path.write_bytes(b"partial")
    export_ok(gpt2_dir, tmp_path / "model.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model.gguf", left[1].name])


# --------------------------------------------------------------------------- end to end: the command line


@pytest.mark.e2e
def test_command_line_exports_gpt2_and_refuses_governed_simone(trained_gpt2, trained_simone, tmp_path):
    proc = run_ok(EXPORT, "--model_dir", trained_gpt2, "--output", tmp_path / "gpt2.gguf", "--dtype", "q8_0")
    assert f"wrote {tmp_path / 'gpt2.gguf'} (gpt2, q8_0, 28 tensors" in proc.stdout
    assert gguf.GGUFReader(str(tmp_path / "gpt2.gguf")).get_field("general.file_type").contents() == 7
    proc = run_script(EXPORT, "--model_dir", trained_simone, "--output", tmp_path / "simone.gguf")
    assert proc.returncode == 2
    assert_one_line_error(proc, "governance", "policy_gate", "memory_tokens=")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2.gguf"]
