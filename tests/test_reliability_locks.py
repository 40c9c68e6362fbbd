"""The fault suite, one writer per folder: a live holder's PID named to a second trainer,
validation or cache build, a dead holder's lock taken over, a finished model never replaced by a
run the orchestrator cannot place (RELIABILITY.md lists what each proves)."""
import json
import os
import signal

import pytest

from mvlm_engine.errors import TrainingInterrupted, UserError
from mvlm_engine.locks import lock_folder, wait_for_lock
from mvlm_engine.stopping import STOP
from helpers.reliability import hold_lock_in_child, save, tiny_training_state


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


# --------------------------------------------------------------------------- the orchestrator and the trainers


@pytest.mark.parametrize("script", ["mvlm_trainer.py", "enhanced_train.py"])
def test_every_kind_of_second_trainer_is_refused_with_the_holders_pid(script, small_corpus, tmp_path):
    from helpers.battery import load_script
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
    from helpers.battery import load_script
    validate = load_script("validate_models.py")
    (tmp_path / "models" / "run").mkdir(parents=True)
    child = hold_lock_in_child(tmp_path / "models" / "run", "mvlm_trainer.py training")
    try:
        with pytest.raises(UserError, match=rf"run is in use by mvlm_trainer.py training \(PID {child.pid}"):
            validate.main(["--models_dir", str(tmp_path / "models"), "--names", "run", "--data_dir", str(small_corpus)])
    finally:
        child.kill()
        child.wait()


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
