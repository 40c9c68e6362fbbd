"""train_all_models.py end to end on CPU, its resume after a kill, and validate_models.py tampering."""
import json
import math
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO, run_script

pytestmark = pytest.mark.e2e

PIPELINE = REPO / "train_all_models.py"
VALIDATE = REPO / "validate_models.py"
QUICK_VALIDATION = ["--eval_windows", 8, "--recall_verses", 5, "--retrieval_pairs", 20]


def pipeline_args(corpus, root, steps=24):
    return [PIPELINE, "--preset", "auto", "--data_dir", corpus, "--models_dir", root / "models", "--download_dir",
            root / "downloads", "--logs_dir", root / "logs", "--trainer_args",
            f"--max_steps {steps} --vocab_size 512 --batch_size 8 --eval_interval 8 --save_interval 8 --log_interval 4"]


@pytest.fixture(scope="module")
def pipeline_run(small_corpus, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    proc = run_script(*pipeline_args(small_corpus, root), timeout=1200)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return root, proc


def test_pipeline_leaves_models_archives_summary_and_a_passing_report(pipeline_run):
    root, proc = pipeline_run
    assert "preset tiny: no CUDA GPU is visible" in proc.stdout
    assert "took over" not in proc.stdout  # each stage released its folders: no lock looked abandoned
    summary = json.loads((root / "models" / "training_summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == ["corpus", "gpt2", "simone", "validate", "package", "archives"]
    assert summary["stages"][-1]["status"] == "passed"
    for stage in summary["stages"][1:3]:
        assert stage["status"] == "done" and stage["steps"] == 24 and stage["tokens_seen"] == 24 * 8 * 128
        # bits per byte = nats per token / ln 2 / bytes per token; a 512-token BPE averages 1.5 to 4 bytes.
        assert 1.5 < stage["final_val_loss"] / math.log(2) / stage["final_val_bpb"] < 4
        assert 0 < stage["exported_step"] <= 24 and stage["final_val_bpb"] <= stage["last_val_bpb"]
    for name in ("mvlm_gpt2", "simone_enhanced"):
        assert (root / "models" / name / "model.safetensors").is_file()
        assert not (root / "models" / name / ".lock").exists()  # released and removed: nothing for an upload to carry
        assert (root / "downloads" / f"{name}.tar.gz").is_file()
        assert (root / "logs" / ("gpt2.log" if name == "mvlm_gpt2" else "simone.log")).is_file()
    assert (root / "downloads" / "SHA256SUMS").read_text().count(".tar.gz") == 2
    assert "sha256sum -c SHA256SUMS" in (root / "downloads" / "DOWNLOAD.md").read_text()
    # MVLM-GPT2 gets its GGUF files beside its archive (4-bit where llama-cpp-python is installed); the
    # pipeline's SIM-ONE (policy gate, memory tokens) a note.
    ggufs = sorted(p.name for p in (root / "downloads").glob("*.gguf"))
    expected = {"mvlm_gpt2-f16.gguf", "mvlm_gpt2-q8_0.gguf"}
    assert expected <= set(ggufs) <= expected | {"mvlm_gpt2-q4_k_m.gguf"}
    assert (root / "downloads" / "SHA256SUMS").read_text().count(".gguf") == len(ggufs)
    download = (root / "downloads" / "DOWNLOAD.md").read_text()
    assert "llama-cli -m mvlm_gpt2-f16.gguf" in download and "FROM ./mvlm_gpt2-f16.gguf" in download
    assert "- no `-f16.gguf`, `-q8_0.gguf`, `-q4_k_m.gguf` files: cannot export to GGUF: SIM-ONE has governance" \
        in download
    report = json.loads((root / "models" / "validation_report.json").read_text())
    assert report["passed"] and set(report["models"]) == {"mvlm_gpt2", "simone_enhanced", "archives"}
    for name in ("mvlm_gpt2", "simone_enhanced"):
        metrics = report["models"][name]["metrics"]
        retrieval = metrics["retrieval_at_1"]
        assert retrieval["pairs"] == 200 and retrieval["chance"] == 1 / 200
        assert abs(retrieval["score"] * 200 - round(retrieval["score"] * 200)) < 1e-3  # a share of 200 verses
        # The report's held-out figure is the trainer's final evaluation of the same model, re-measured
        # over fewer windows: the same order of magnitude.
        stage = {s["stage"]: s for s in summary["stages"]}[{"mvlm_gpt2": "gpt2", "simone_enhanced": "simone"}[name]]
        assert 0.8 < metrics["held_out"]["val_bpb"] / stage["final_val_bpb"] < 1.25
        samples = metrics["generation"]["samples"]
        assert len(samples) == 4 and all(s["greedy"].strip() for s in samples.values())
    assert (root / "models" / "validation_report.md").read_text().startswith("# Validation report")
    assert (root / "models" / "validation_metrics.png").stat().st_size > 0
    assert json.loads((root / "models" / "validation_trace_simone_enhanced.json").read_text())["trace"]


def test_folders_are_hub_ready_with_cards_from_the_report(pipeline_run):
    """generation_config.json samples by default; README.md is a model card whose figures are the
    validation report's; the archives carry the cards; a left-padded pipeline batch was checked."""
    import tarfile

    import yaml

    root, _ = pipeline_run
    report = json.loads((root / "models" / "validation_report.json").read_text())
    for name in ("mvlm_gpt2", "simone_enhanced"):
        folder = root / "models" / name
        generation = json.loads((folder / "generation_config.json").read_text())
        assert generation["do_sample"] is True and 0 < generation["temperature"] < 1
        checks = {c["check"]: c["passed"] for c in report["models"][name]["checks"]}
        assert checks["padded batch"] and checks["loading"]
        card = (folder / "README.md").read_text()
        front = yaml.safe_load(card.split("---\n")[1])
        assert front["library_name"] == "transformers" and front["pipeline_tag"] == "text-generation"
        assert front["language"] == ["en"] and front["license"] and ("custom_code" in front["tags"]) == (
            name == "simone_enhanced")
        held_out = report["models"][name]["metrics"]["held_out"]
        metrics = {m["name"]: m["value"] for m in front["model-index"][0]["results"][0]["metrics"]}
        assert metrics["held-out loss (nats/token)"] == round(held_out["val_loss"], 4)
        assert f"{held_out['val_bpb']:,.4f}" in card and "## Training data" in card
        with tarfile.open(root / "downloads" / f"{name}.tar.gz") as tar:
            assert tar.extractfile(f"{name}/README.md").read().decode() == card


def test_rerun_skips_finished_stages(pipeline_run, small_corpus):
    root, _ = pipeline_run
    proc = run_script(*pipeline_args(small_corpus, root), timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    stages = json.loads((root / "models" / "training_summary.json").read_text())["stages"]
    assert [s["status"] for s in stages[:3]] == ["skipped (already built)", "skipped (already trained)",
                                                 "skipped (already trained)"]


def test_killed_during_simone_resumes_without_retraining_gpt2(small_corpus, tmp_path):
    args = pipeline_args(small_corpus, tmp_path, steps=48)
    proc = subprocess.Popen([sys.executable, *map(str, args)], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    history = tmp_path / "models" / "simone_enhanced" / "training_history.json"
    deadline = time.time() + 600
    while not history.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGTERM)  # to the orchestrator only; it passes it on to the trainer
    _, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 130, stderr[-3000:]
    checkpoints = list((tmp_path / "models" / "simone_enhanced" / "checkpoints").glob("step_*"))
    assert checkpoints and not (tmp_path / "models" / "simone_enhanced" / "run_summary.json").exists()
    gpt2_weights = (tmp_path / "models" / "mvlm_gpt2" / "model.safetensors").stat().st_mtime_ns

    again = run_script(*pipeline_args(small_corpus, tmp_path, steps=48), timeout=1200)
    assert again.returncode == 0, again.stderr[-3000:]
    stages = json.loads((tmp_path / "models" / "training_summary.json").read_text())["stages"]
    assert {s["stage"]: s["status"] for s in stages}["gpt2"] == "skipped (already trained)"
    assert {s["stage"]: s["status"] for s in stages}["simone"] == "resumed and done"
    assert "resumed from" in (tmp_path / "logs" / "simone.log").read_text()
    assert (tmp_path / "models" / "mvlm_gpt2" / "model.safetensors").stat().st_mtime_ns == gpt2_weights


def validate(root):
    return run_script(VALIDATE, "--models_dir", root / "models", "--download_dir", root / "downloads",
                      "--data_dir", json.loads((root / "models" / "mvlm_gpt2" / "train_config.json").read_text())
                      ["data_dir"], *QUICK_VALIDATION, timeout=900)


@pytest.fixture
def copy_of_run(pipeline_run, tmp_path):
    root, _ = pipeline_run
    shutil.copytree(root / "models", tmp_path / "models", ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    shutil.copytree(root / "downloads", tmp_path / "downloads")
    shutil.rmtree(tmp_path / "models" / "simone_enhanced")  # one model is enough to show each failure
    return tmp_path


def test_changed_archive_byte_fails_and_names_the_archive(copy_of_run):
    archive = copy_of_run / "downloads" / "mvlm_gpt2.tar.gz"
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF
    archive.write_bytes(bytes(data))
    proc = validate(copy_of_run)
    assert proc.returncode == 1
    assert "FAILED archives" in proc.stderr and "mvlm_gpt2.tar.gz" in proc.stderr


def test_truncated_weights_fail_and_name_the_file(copy_of_run):
    weights = copy_of_run / "models" / "mvlm_gpt2" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    proc = validate(copy_of_run)
    assert proc.returncode == 1
    assert "FAILED integrity" in proc.stderr and "mvlm_gpt2/model.safetensors" in proc.stderr


def test_missing_tokenizer_fails_and_names_the_file(copy_of_run):
    (copy_of_run / "models" / "mvlm_gpt2" / "tokenizer.json").unlink()
    proc = validate(copy_of_run)
    assert proc.returncode == 1
    assert "FAILED integrity" in proc.stderr and "mvlm_gpt2/tokenizer.json: missing" in proc.stderr


def test_a_failed_stage_names_itself_and_its_log(small_corpus, tmp_path):
    args = pipeline_args(small_corpus, tmp_path)
    args[-1] = "--batch_size 0"  # the trainers refuse it
    proc = run_script(*args, timeout=600)
    assert proc.returncode == 1
    assert "stage 'gpt2' failed" in proc.stderr and str(tmp_path / "logs" / "gpt2.log") in proc.stderr
    assert "--batch_size must be > 0" in (tmp_path / "logs" / "gpt2.log").read_text()
    stages = json.loads((tmp_path / "models" / "training_summary.json").read_text())["stages"]
    assert stages[-1]["stage"] == "gpt2" and stages[-1]["status"] == "failed"
