"""Kill -9 and signals end to end, in subprocesses: the CI share of benchmarks/kill9_trials.py
(two trials, one of them inside a checkpoint write) and a stop during a long evaluation, both
resumed to bit-identical weights; the CI share of its --pipeline trials (the whole
train_all_models.py killed and run again); two trainers on one folder; validation during training."""
import contextlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, TIMEOUT, assert_one_line_error, run_script
from mvlm_engine.locks import folder_holder

pytestmark = pytest.mark.e2e
STEPS = 8

spec = importlib.util.spec_from_file_location("kill9_trials", REPO / "benchmarks" / "kill9_trials.py")
kill9 = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kill9)


@pytest.fixture(scope="module")
def reference(small_corpus, tmp_path_factory):
    """An uninterrupted run: the weights every interrupted and resumed run must end with."""
    work = tmp_path_factory.mktemp("kill9")
    kill9.reference_run("gpt2", small_corpus, work / "reference", STEPS)
    return work, work / "reference" / "model.safetensors"


def test_kill9_inside_a_checkpoint_write_and_at_a_random_moment_then_resume_is_bit_identical(small_corpus, reference):
    work, weights = reference
    results = [kill9.trial("gpt2", small_corpus, work, seed, inside, weights, steps=STEPS)
               for seed, inside in ((0, True), (1, False))]
    assert all(r["identical"] and r["was_killed"] for r in results), results
    assert results[0]["landed_in_write"], results  # aimed at a write, killed inside it
    assert all(r["took_over"] for r in results), results  # the dead trainer's lock, taken over and logged


def test_kill9_of_the_whole_pipeline_in_the_tokenizer_child_and_an_archive_write_then_a_rerun_ends_as_uninterrupted(
        tmp_path):
    """The CI share of kill9_trials.py --pipeline (MVLM-GPT2 only; the 10-trial set kills every stage of
    both models: RELIABILITY.md): weights and .gguf identical to an uninterrupted run's, every stage
    finished, SHA256SUMS verifying, the report whole, nothing left behind."""
    pipeline = kill9.kill9_pipeline
    results = pipeline.run_pipeline_trials(tmp_path, 2, 4, "gpt2", ("tokenizer child", "archive write"))
    assert all(r["passed"] for r in results), [pipeline.describe(r) for r in results]
    assert [r["landed"] for r in results] == ["tokenizer child", "archive write"], [pipeline.describe(r) for r in results]
    assert results[0]["took_over"]  # the dead trainer's and tokenizer build's locks, taken over and logged


def wait_for_step(proc, history, step):
    deadline = time.time() + TIMEOUT
    while proc.poll() is None and time.time() < deadline:
        try:
            if any(r["step"] == step for r in json.loads(history.read_text())["train"]):
                return
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.01)
    raise AssertionError(f"step {step} was not reached")


def stderr_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress bar."""
    return [line for line in stderr.replace("\r", "\n").splitlines()
            if line.strip() and "it/s]" not in line and "s/it]" not in line and "%|" not in line]


def test_signals_during_a_long_evaluation_stop_within_seconds_and_resume_exactly(small_corpus, reference, tmp_path):
    _, weights = reference
    out = tmp_path / "run"
    # 300 held-out windows at steps 4 and 8: an evaluation of ~40 batches, far longer than a stop may take.
    args = kill9.command("gpt2", small_corpus, out, "--eval_interval", "4", "--eval_windows", "300", steps=STEPS)
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    wait_for_step(proc, out / "training_history.json", 4)  # logged just before step 4's evaluation starts
    proc.send_signal(signal.SIGTERM)
    for repeat in (signal.SIGINT, signal.SIGTERM):  # impatient repeats: still one clean stop
        time.sleep(0.05)
        if proc.poll() is None:
            proc.send_signal(repeat)
    _, stderr = proc.communicate(timeout=TIMEOUT)
    lines = stderr_lines(stderr)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-2000:]
    assert "Traceback" not in stderr and len(lines) == 1 and "stopped by SIGTERM at step 4/8" in lines[0], lines
    state = json.loads((out / "checkpoints" / "step_000004" / "trainer_state.json").read_text())
    history = json.loads((out / "training_history.json").read_text())
    assert state["eval_pending"] and not history["eval"], "the evaluation ran to its end: the stop was not prompt"

    resumed = run_script(*args[1:], "--resume_from", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "took over" not in resumed.stdout  # the stopped trainer released its folder on its way out
    assert [r["step"] for r in json.loads((out / "training_history.json").read_text())["eval"]] == [4, 8]
    assert kill9.same_weights(weights, out / "model.safetensors")


SLOW_EXIT = """
import sys, time
from mvlm_engine.cli import run_cli
from mvlm_engine.stopping import STOP

class SlowTeardown:  # module teardown that takes a while, as torch's can
    def __del__(self):
        time.sleep(1.5)
keep = SlowTeardown()

def main(argv):
    with STOP.deferred():
        print("ready", flush=True)
        while True:
            time.sleep(0.01)
            STOP.check("testing", "the test's checkpoint was saved")
run_cli("slow_exit", main, [])
"""


def test_repeats_during_the_interpreters_exit_do_not_change_the_exit_status():
    """Python puts the default handlers back before tearing the modules down; a repeat landing
    then must not kill the process by the signal (exit -15) after its stop was honoured."""
    proc = subprocess.Popen([sys.executable, "-c", SLOW_EXIT], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert proc.stdout.readline() == "ready\n"
    proc.send_signal(signal.SIGTERM)
    sent = 1
    while proc.poll() is None:  # repeats every 50 ms until the process is gone: some land in the teardown
        time.sleep(0.05)
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
            sent += 1
    _, stderr = proc.communicate(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM, (sent, stderr[-2000:])
    assert stderr.strip() == "slow_exit: stopped by SIGTERM while testing; the test's checkpoint was saved"


def test_a_finished_trainer_releases_its_folder_and_the_next_stage_takes_over_nothing(small_corpus, tmp_path):
    out = tmp_path / "models" / "run"
    trained = run_script(*kill9.command("gpt2", small_corpus, out, steps=2)[1:])
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert not (out / ".lock").exists() and folder_holder(out) is None  # released and removed, not left to the kernel
    validated = run_script(REPO / "validate_models.py", "--models_dir", out.parent, "--data_dir", small_corpus,
                           "--names", out.name, "--no_archives")
    assert (out.parent / "validation_report.md").is_file(), validated.stderr[-2000:]  # the next stage ran
    assert "took over" not in validated.stdout + validated.stderr
    assert not (out / ".lock").exists()  # and released the folder in turn, leaving no lock file to upload


def test_a_second_trainer_and_validation_are_refused_while_a_training_runs(small_corpus, tmp_path):
    out = tmp_path / "models" / "run"
    args = kill9.command("gpt2", small_corpus, out, steps=400)
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_step(proc, out / "training_history.json", 2)
        holder = f"is in use by mvlm_trainer.py training (PID {proc.pid}"
        assert_one_line_error(run_script(*args[1:], "--resume_from", "latest"), holder, f"kill {proc.pid}")
        assert_one_line_error(run_script(REPO / "validate_models.py", "--models_dir", out.parent, "--data_dir",
                                         small_corpus, "--names", out.name, "--no_archives"), f"{out} {holder}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=TIMEOUT)
    assert proc.returncode == 128 + signal.SIGTERM
    assert not (out / "run_summary.json").exists() and list((out / "checkpoints").glob("step_*"))
