"""Enhanced SIM-ONE training end to end on CPU: every mechanism and loss on."""
import json
import math
import os
import shutil
import subprocess
import sys

import pytest

from conftest import ISOLATE_FROM_REPO, REPO, assert_one_line_error, assert_same_weights, run_ok, run_script

SIMONE_DIR = REPO / "SIM-ONE Training"
TRAIN = SIMONE_DIR / "enhanced_train.py"
VOCAB = 1024
TERMS = ["loss/accuracy", "loss/coherence", "loss/alignment", "loss/stability"]


def tiny_args(data_dir, out, *extra):
    return [TRAIN, "--preset", "tiny", "--data_dir", data_dir, "--output_dir", out, "--vocab_size", VOCAB,
            "--device", "cpu", "--batch_size", 8, "--seed", 3, *extra]


@pytest.fixture(scope="module")
def trained(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("simone") / "run"
    run_ok(*tiny_args(small_corpus, out, "--max_steps", 80, "--eval_interval", 40, "--save_interval", 40,
                      "--log_interval", 5))
    return out


def test_everything_on_trains_and_logs_every_term(trained):
    history = json.loads((trained / "training_history.json").read_text())
    config = json.loads((trained / "train_config.json").read_text())
    assert config["policy_gate"] and config["memory_tokens"] > 0
    assert all(config[w] > 0 for w in ("coherence_weight", "alignment_weight", "z_loss_weight"))
    for record in history["train"]:
        assert all(term in record and math.isfinite(record[term]) for term in TERMS), record
    first, last = history["train"][0], history["train"][-1]
    assert last["loss/accuracy"] < first["loss/accuracy"] - 1.0
    assert last["loss/coherence"] < first["loss/coherence"]
    assert history["eval"][-1]["val_loss"] < history["eval"][0]["val_loss"]
    assert history["eval"][-1]["val_loss"] < math.log(VOCAB) - 1.5
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "hf_model.py",
                 "training_history.json", "loss_curve.png", "train_config.json", "run_summary.json"]:
        assert (trained / name).is_file(), name
    assert list((trained / "tensorboard").glob("events.out.tfevents.*"))
    assert (trained / "checkpoints" / "best_model").is_dir()


def test_quality_seeds_are_single_tokens_and_round_trip(trained):
    from tokenizers import Tokenizer
    from prioritary_mvlm.advanced_tokenizer import seeds_split_apart
    from prioritary_mvlm.config import DEFAULT_QUALITY_SEEDS
    tokenizer = Tokenizer.from_file(str(trained / "tokenizer.json"))
    assert seeds_split_apart(tokenizer, list(DEFAULT_QUALITY_SEEDS)) == []
    # A small vocabulary would split these names without the seeds.
    for seed in ("Nebuchadnezzar", "Melchizedek"):
        assert len(tokenizer.encode(" " + seed).ids) == 1
    text = "[KJV] Then Nebuchadnezzar's  men,\n\tMelchizedeks and Zion-ward; “Pharisees”!"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


CLEAN_LOAD = ISOLATE_FROM_REPO + r"""
import json, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
model = AutoModelForCausalLM.from_pretrained(sys.argv[1], trust_remote_code=True).eval()
tokenizer = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
ids = tokenizer("[KJV] John 3:16 For God so", return_tensors="pt").input_ids
out = model.generate(ids, max_new_tokens=24, do_sample=False)
print(json.dumps({"text": tokenizer.decode(out[0][ids.shape[1]:]), "logits_sum": float(model(ids).logits.sum().detach())}))
"""


def test_loads_with_trust_remote_code_alone_and_generates(trained, tmp_path):
    proc = subprocess.run([sys.executable, "-c", CLEAN_LOAD, str(trained)], cwd=tmp_path, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": ""})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    words = [w for w in result["text"].split() if w.strip(".,;:").isalpha()]
    assert len(words) >= 4, result["text"]
    import torch
    from simone_transformer.hf_model import load_native
    from tokenizers import Tokenizer
    ids = Tokenizer.from_file(str(trained / "tokenizer.json")).encode("[KJV] John 3:16 For God so").ids
    with torch.no_grad():
        native = load_native(trained)(torch.tensor([ids])).logits.sum().item()
    assert result["logits_sum"] == pytest.approx(native, rel=1e-5)


def test_resume_is_exact_with_every_mechanism_on(small_corpus, tmp_path):
    common = ["--max_steps", 16, "--save_interval", 8, "--eval_interval", 8, "--log_interval", 4,
              "--keep_checkpoints", 5]
    full = run_script(*tiny_args(small_corpus, tmp_path / "full", *common))
    assert full.returncode == 0, full.stderr[-3000:]
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000008", resumed_dir / "step_000008")
    proc = run_script(*tiny_args(small_corpus, tmp_path / "resumed", *common, "--resume_from", "latest"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert_same_weights(tmp_path / "full" / "model.safetensors", tmp_path / "resumed" / "model.safetensors")
    # The auxiliary head and everything else in the training module too.
    assert_same_weights(tmp_path / "full" / "checkpoints" / "step_000016" / "model.safetensors",
                        tmp_path / "resumed" / "checkpoints" / "step_000016" / "model.safetensors")


def test_default_paths_are_the_same_from_the_folder_and_the_root(monkeypatch):
    sys.path.insert(0, str(SIMONE_DIR))
    import enhanced_train
    resolved = []
    for cwd in (REPO, SIMONE_DIR):
        monkeypatch.chdir(cwd)
        args = enhanced_train.parse_args([])
        resolved.append(os.path.realpath(enhanced_train.SEED_DEFAULTS["data_dir"]))
        assert args.data_dir is None  # the default comes from SEED_DEFAULTS, anchored at this file
    assert resolved[0] == resolved[1] == str(REPO / "mvlm_training_dataset_complete")


def test_train_py_runs_from_inside_the_folder(small_corpus, tmp_path):
    proc = run_script(SIMONE_DIR / "train.py", "--preset", "tiny", "--data_dir", small_corpus, "--output_dir",
                      tmp_path / "out", "--vocab_size", VOCAB, "--max_steps", 2, "--eval_interval", 2,
                      "--save_interval", 2, "--batch_size", 4, "--device", "cpu", cwd=SIMONE_DIR)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_bad_config_values_are_one_line_errors(small_corpus, tmp_path):
    out = tmp_path / "never"
    assert_one_line_error(run_script(*tiny_args(small_corpus, out, "--coherence_weight", -0.5)),
                          "--coherence_weight must be >= 0")
    config = tmp_path / "heads.json"
    config.write_text(json.dumps({"n_heads": 3}))
    assert_one_line_error(run_script(*tiny_args(small_corpus, out, "--config", config)), "divisible by n_heads")
    config.write_text(json.dumps({"n_heads": 4, "dropout_rate": 0.1}))
    assert_one_line_error(run_script(*tiny_args(small_corpus, out, "--config", config)),
                          "unknown PrioritaryConfig key(s): dropout_rate")
    no_verses = tmp_path / "corpus"
    shutil.copytree(small_corpus, no_verses, ignore=shutil.ignore_patterns(".cache"))
    (no_verses / "verses.jsonl").unlink()
    assert_one_line_error(run_script(*tiny_args(no_verses, out)), "verses.jsonl is missing")
    assert not out.exists()


def test_tokenizer_that_does_not_match_the_checkpoint_is_refused(small_corpus, trained, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained, out)
    before = (out / "model.safetensors").read_bytes()
    proc = run_script(*tiny_args(small_corpus, out, "--vocab_size", VOCAB // 2, "--max_steps", 90,
                                 "--resume_from", "latest"))
    assert_one_line_error(proc, "another tokenizer")
    assert (out / "model.safetensors").read_bytes() == before
