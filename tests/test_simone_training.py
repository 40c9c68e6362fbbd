"""Enhanced SIM-ONE training end to end on CPU: every mechanism and loss on."""
import json
import math
import shutil

import pytest

import conftest
from conftest import (REPO, SIMONE_TRAINER, TEST_VOCAB, assert_one_line_error, assert_plain_file_modes,
                      assert_same_weights, run_script)

pytestmark = pytest.mark.e2e
SIMONE_DIR = REPO / "SIM-ONE Training"
VOCAB = TEST_VOCAB
TERMS = ["loss/accuracy", "loss/coherence", "loss/alignment", "loss/stability"]


def tiny_args(data_dir, out, *extra):
    """The default recipe (Muon included) plus the auxiliary losses, which are off by default."""
    return conftest.tiny_args(SIMONE_TRAINER, data_dir, out, "--batch_size", 8, *conftest.SIMONE_AUX_LOSSES_ON,
                              *extra, seed=3)


def test_everything_on_trains_and_logs_every_term(trained_simone):
    history = json.loads((trained_simone / "training_history.json").read_text())
    config = json.loads((trained_simone / "train_config.json").read_text())
    assert config["model"]["policy_gate"] and config["model"]["memory_tokens"] > 0
    assert all(config[w] > 0 for w in ("coherence_weight", "alignment_weight", "z_loss_weight"))
    assert config["optimizer"] == "muon" and not config["model"]["tie_embeddings"] and config["model"]["zero_init_head"]
    for record in history["train"]:
        assert all(term in record and math.isfinite(record[term]) for term in TERMS), record
    first, last = history["train"][0], history["train"][-1]
    assert last["loss/accuracy"] < first["loss/accuracy"] - 1.0
    assert last["loss/coherence"] < first["loss/coherence"]
    assert history["eval"][-1]["val_loss"] < history["eval"][0]["val_loss"]
    assert history["eval"][-1]["val_loss"] < math.log(VOCAB) - 1.5
    for name in ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "hf_model.py",
                 "training_history.json", "loss_curve.png", "train_config.json", "run_summary.json"]:
        assert (trained_simone / name).is_file(), name
    assert_plain_file_modes(trained_simone)
    assert list((trained_simone / "tensorboard").glob("events.out.tfevents.*"))
    assert (trained_simone / "checkpoints" / "best_model").is_dir()


def test_quality_seeds_are_single_tokens_and_round_trip(trained_simone):
    from tokenizers import Tokenizer
    from prioritary_mvlm.advanced_tokenizer import seeds_split_apart
    from prioritary_mvlm.config import DEFAULT_QUALITY_SEEDS
    tokenizer = Tokenizer.from_file(str(trained_simone / "tokenizer.json"))
    assert seeds_split_apart(tokenizer, list(DEFAULT_QUALITY_SEEDS)) == []
    # A small vocabulary would split these names without the seeds.
    for seed in ("Nebuchadnezzar", "Melchizedek"):
        assert len(tokenizer.encode(" " + seed).ids) == 1
    text = "[KJV] Then Nebuchadnezzar's  men,\n\tMelchizedeks and Zion-ward; “Pharisees”!"
    assert tokenizer.decode(tokenizer.encode(text).ids) == text


def test_loads_with_trust_remote_code_alone_and_generates(trained_simone):
    from mvlm_engine.isolation import load_in_clean_interpreter
    result = load_in_clean_interpreter(trained_simone, "[KJV] John 3:16 For God so", trust_remote_code=True, new_tokens=24)
    words = [w for w in result["text"].split() if w.strip(".,;:").isalpha()]
    assert len(words) >= 4, result["text"]
    import torch
    from simone_transformer.hf_model import load_native
    with torch.no_grad():
        native = load_native(trained_simone)(torch.tensor([result["ids"]])).logits[0]
    torch.testing.assert_close(torch.tensor(result["logits"]), native, atol=1e-5, rtol=1e-5)


def test_its_own_train_config_reproduces_the_resolved_settings(trained_simone, tmp_path):
    proc = run_script(SIMONE_TRAINER, "--config", trained_simone / "train_config.json", "--print_config", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == json.loads((trained_simone / "train_config.json").read_text())


def test_resume_is_exact_with_every_mechanism_on(small_corpus, tmp_path):
    """The default recipe (Muon and its AdamW groups, the schedule) plus every loss resumes bit for bit."""
    # --prefetch_batches: the CUDA default, switched on here so that a checkpoint taken while the
    # next batch is already drawn is exercised too (the GPT-2 resume test runs without it).
    common = ["--max_steps", 16, "--save_interval", 8, "--eval_interval", 8, "--log_interval", 4,
              "--keep_checkpoints", 5, "--prefetch_batches"]
    full = run_script(*tiny_args(small_corpus, tmp_path / "full", *common))
    assert full.returncode == 0, full.stderr[-3000:]
    resumed_dir = tmp_path / "resumed" / "checkpoints"
    resumed_dir.mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000008", resumed_dir / "step_000008")
    proc = run_script(*tiny_args(small_corpus, tmp_path / "resumed", *common, "--resume_from", "latest"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "resumed from" in proc.stdout
    assert json.loads((tmp_path / "resumed" / "train_config.json").read_text())["optimizer"] == "muon"
    assert_same_weights(tmp_path / "full" / "model.safetensors", tmp_path / "resumed" / "model.safetensors")
    # The auxiliary head and everything else in the training module too.
    assert_same_weights(tmp_path / "full" / "checkpoints" / "step_000016" / "model.safetensors",
                        tmp_path / "resumed" / "checkpoints" / "step_000016" / "model.safetensors")


def test_default_paths_are_the_same_from_the_folder_and_the_root():
    resolved = []
    for cwd in (REPO, SIMONE_DIR):
        proc = run_script(SIMONE_TRAINER, "--print_config", cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        resolved.append(json.loads(proc.stdout))
    assert resolved[0] == resolved[1]
    assert resolved[0]["data_dir"] == str(REPO / "mvlm_training_dataset_complete")
    assert resolved[0]["output_dir"] == str(REPO / "models" / "simone_enhanced")


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
    config.write_text(json.dumps({"model": {"n_heads": 4, "dropout_rate": 0.1}, "alignment_pairs": "8"}))
    assert_one_line_error(run_script(*tiny_args(small_corpus, out, "--config", config)),
                          "unknown PrioritaryConfig key(s): model.dropout_rate", "--alignment_pairs must be an int")
    no_verses = tmp_path / "corpus"
    shutil.copytree(small_corpus, no_verses, ignore=shutil.ignore_patterns(".cache"))
    (no_verses / "verses.jsonl").unlink()
    assert_one_line_error(run_script(*tiny_args(no_verses, out)), "verses.jsonl is missing")
    assert not out.exists()


def test_tokenizer_that_does_not_match_the_checkpoint_is_refused(small_corpus, trained_simone, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(trained_simone, out)
    before = (out / "model.safetensors").read_bytes()
    proc = run_script(*tiny_args(small_corpus, out, "--vocab_size", VOCAB // 2, "--max_steps", 90,
                                 "--resume_from", "latest"))
    assert_one_line_error(proc, "another tokenizer")
    assert (out / "model.safetensors").read_bytes() == before
