"""Distillation from finished model folders (--teachers, --distill_weight, --distill_temperature)
and the held-out bits per byte of a probability-averaged ensemble of folders."""
import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

import conftest
from conftest import (GPT2_NO_DROPOUT, GPT2_TRAINER, SIMONE_TRAINER, assert_one_line_error, assert_same_weights, run_ok,
                      run_script)
from mvlm_engine.distillation import TEACHER_LOG_PROBS, distillation_loss
from mvlm_engine.ensemble import ensemble_bpb, ensemble_log_probs, evaluate_ensemble
from release.trust import folder_check

pytestmark = pytest.mark.e2e
TIMING_KEYS = {"tokens_per_s", "mfu"}


# --------------------------------------------------------------------------- the term, by hand


def test_the_term_is_t_squared_kl_of_the_teachers_from_the_model_averaged_over_tokens():
    teacher_probs = [[0.7, 0.2, 0.1], [0.25, 0.25, 0.5]]
    student_logits = [[1.0, 0.0, -1.0], [0.5, 2.0, 0.0]]
    temperature = 2.0
    expected = 0.0
    for p, z in zip(teacher_probs, student_logits):
        norm = sum(math.exp(v / temperature) for v in z)
        q = [math.exp(v / temperature) / norm for v in z]
        expected += sum(pi * math.log(pi / qi) for pi, qi in zip(p, q)) / len(teacher_probs)
    logits = torch.tensor(student_logits, requires_grad=True)
    term = distillation_loss(logits[None], torch.tensor(teacher_probs).log()[None], temperature)  # (1, 2, V)
    assert term.item() == pytest.approx(temperature ** 2 * expected, rel=1e-6)
    term.backward()  # d/dz T^2 KL = T (softmax(z / T) - p), averaged over the rows
    q = torch.softmax(torch.tensor(student_logits) / temperature, dim=-1)
    torch.testing.assert_close(logits.grad, temperature * (q - torch.tensor(teacher_probs)) / 2)
    assert distillation_loss(torch.tensor(teacher_probs).log() * temperature, torch.tensor(teacher_probs).log(),
                             temperature).abs().item() < 1e-6  # the teachers' own distribution costs nothing


def test_the_ensemble_averages_probabilities_not_logits():
    first, second = torch.tensor([[2.0, 0.0, -2.0]]), torch.tensor([[-3.0, 1.0, 0.5]])
    for temperature in (1.0, 2.0):
        mean = (torch.softmax(first / temperature, -1) + torch.softmax(second / temperature, -1)) / 2
        torch.testing.assert_close(ensemble_log_probs([first, second], temperature), mean.log())
        assert not torch.allclose(ensemble_log_probs([first, second], temperature),
                                  torch.log_softmax((first + second) / 2 / temperature, -1))
    torch.testing.assert_close(ensemble_log_probs([first]), torch.log_softmax(first, -1))


def test_without_teachers_targets_the_objectives_compute_what_they_did():
    """No targets in the batch: the same loss bit for bit whatever the distillation settings;
    with them: cross-entropy + weight * the term, both logged."""
    from mvlm_trainer import CausalLMObjective, GPT2Shape, build_model
    torch.manual_seed(0)
    shape = GPT2Shape(n_layer=1, n_embd=32, n_head=2, **GPT2_NO_DROPOUT)
    model = build_model(shape, vocab_size=300, block_size=16, eos=0)
    ids = torch.randint(0, 300, (2, 17))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    for chunked in (True, False):
        plain, _ = CausalLMObjective(model, chunked)(batch)
        distilling, terms = CausalLMObjective(model, chunked, distill_weight=0.5, distill_temperature=2.0)(batch)
        assert torch.equal(plain, distilling) and terms == {}
    teacher = torch.log_softmax(torch.randn(2, 16, 300), dim=-1)
    total, terms = CausalLMObjective(model, True, 0.5, 2.0)({**batch, TEACHER_LOG_PROBS: teacher})
    logits = model(input_ids=batch["input_ids"]).logits
    torch.testing.assert_close(terms["loss/distill"], distillation_loss(logits, teacher, 2.0))
    torch.testing.assert_close(terms["loss/accuracy"], CausalLMObjective(model, False)(batch)[0])
    torch.testing.assert_close(total, terms["loss/accuracy"] + 0.5 * terms["loss/distill"])


def test_simone_objective_adds_the_term_only_with_targets():
    from prioritary_mvlm.advanced_losses import CompositeObjective
    from simone_transformer import SimOneConfig, SimOneModel
    torch.manual_seed(0)
    model = SimOneModel(SimOneConfig(vocab_size=300, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1,
                                     ffn_hidden_dim=64, max_seq_len=16, memory_tokens=2))
    ids = torch.randint(0, 300, (2, 17))
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    plain = CompositeObjective(model, {"stability": 1e-4}, adaptive=False, temperature=0.1, chunked_loss=True)
    distilling = CompositeObjective(model, {"stability": 1e-4, "distill": 0.5}, adaptive=False, temperature=0.1,
                                    chunked_loss=True, distill_temperature=2.0)
    assert torch.equal(plain(batch)[0], distilling(batch)[0]) and "loss/distill" not in distilling(batch)[1]
    teacher = torch.log_softmax(torch.randn(2, 16, 300), dim=-1)
    total, logged = distilling({**batch, TEACHER_LOG_PROBS: teacher})
    torch.testing.assert_close(logged["loss/distill"], distillation_loss(model(batch["input_ids"]).logits, teacher, 2.0))
    torch.testing.assert_close(total, logged["loss/accuracy"] + 1e-4 * logged["loss/stability"]
                               + 0.5 * logged["loss/distill"])


# --------------------------------------------------------------------------- teachers trained here


def gpt2_args(data_dir, out, steps, *extra):
    return conftest.tiny_args(GPT2_TRAINER, data_dir, out, "--max_steps", steps, "--log_interval", 2, *extra)


def simone_args(data_dir, out, steps, *extra):
    return conftest.tiny_args(SIMONE_TRAINER, data_dir, out, "--batch_size", 8, "--max_steps", steps,
                              "--log_interval", 2, *extra, seed=3)


@pytest.fixture(scope="module")
def gpt2_teacher(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("gpt2_teacher") / "run"
    run_ok(*gpt2_args(small_corpus, out, 12))
    return out


@pytest.fixture(scope="module")
def simone_teacher(small_corpus, tmp_path_factory):
    out = tmp_path_factory.mktemp("simone_teacher") / "run"
    run_ok(*simone_args(small_corpus, out, 12, "--seed", 11))
    return out


def history_after(folder, step: int) -> dict:
    history = json.loads((folder / "training_history.json").read_text())
    return {kind: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history[kind] if r["step"] > step]
            for kind in ("train", "eval")}


def test_a_teacher_with_weight_zero_changes_nothing(small_corpus, gpt2_teacher, tmp_path):
    """The teacher's own command line plus --teachers (itself) and --distill_weight 0 is the same run."""
    run_ok(*gpt2_args(small_corpus, tmp_path / "again", 12, "--teachers", gpt2_teacher, "--distill_weight", 0))
    assert_same_weights(gpt2_teacher / "model.safetensors", tmp_path / "again" / "model.safetensors")
    assert history_after(gpt2_teacher, 0) == history_after(tmp_path / "again", 0)


def test_simone_learns_from_a_teacher_logs_the_term_and_resumes_exactly(small_corpus, simone_teacher, tmp_path):
    distill = ["--teachers", simone_teacher, "--distill_weight", 0.5, "--distill_temperature", 2.0,
               "--save_interval", 8, "--eval_interval", 8, "--keep_checkpoints", 5]
    full = run_ok(*simone_args(small_corpus, tmp_path / "full", 16, *distill))
    assert "distilling from 1 teacher(s)" in full.stdout
    records = history_after(tmp_path / "full", 0)["train"]
    assert records and all(r["loss/distill"] > 0 for r in records)
    for r in records:  # the logged total is the weighted sum: accuracy + z-loss + 0.5 distill
        assert r["loss"] == pytest.approx(r["loss/accuracy"] + 1e-4 * r["loss/stability"] + 0.5 * r["loss/distill"],
                                          rel=1e-5)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000008",
                    tmp_path / "resumed" / "checkpoints" / "step_000008")
    run_ok(*simone_args(small_corpus, tmp_path / "resumed", 16, *distill, "--resume_from", "latest"))
    assert_same_weights(tmp_path / "full" / "model.safetensors", tmp_path / "resumed" / "model.safetensors")
    assert history_after(tmp_path / "full", 8) == history_after(tmp_path / "resumed", 8)
    # The teacher is no part of the training module: checkpoints hold the student alone.
    student_keys = load_file(str(tmp_path / "full" / "checkpoints" / "step_000016" / "model.safetensors")).keys()
    assert not any("teacher" in key for key in student_keys)


def test_gpt2_learns_from_a_teacher(small_corpus, gpt2_teacher, tmp_path):
    run_ok(*gpt2_args(small_corpus, tmp_path / "student", 8, "--teachers", gpt2_teacher, "--distill_weight", 1.0,
                      "--seed", 9))
    records = history_after(tmp_path / "student", 0)["train"]
    assert records and all(r["loss"] == pytest.approx(r["loss/accuracy"] + r["loss/distill"], rel=1e-5)
                           for r in records)


def bad_copy(folder, tmp_path, damage: str):
    copy = tmp_path / damage
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("checkpoints", "tensorboard"))
    if damage == "other_tokenizer":  # two tokens trade ids: the same size, other encodings
        data = json.loads((copy / "tokenizer.json").read_text())
        vocab = data["model"]["vocab"]
        first, second = sorted(vocab, key=vocab.get)[300:302]
        vocab[first], vocab[second] = vocab[second], vocab[first]
        (copy / "tokenizer.json").write_text(json.dumps(data))
    elif damage == "tampered":  # modelling code that is not the repository's (release/trust.py)
        with open(copy / "hf_model.py", "a") as handle:
            handle.write("\nraise SystemExit('a teacher folder ran its own code')\n")
    else:  # one weight NaN
        tensors = load_file(str(copy / "model.safetensors"))
        name = next(k for k, t in tensors.items() if t.is_floating_point())
        tensors[name] = tensors[name].clone()
        tensors[name].view(-1)[0] = float("nan")
        save_file(tensors, str(copy / "model.safetensors"), metadata={"format": "pt"})
    return copy


def test_bad_teachers_are_refused_in_one_line_before_training(small_corpus, gpt2_teacher, simone_teacher, tmp_path):
    cases = [([tmp_path / "nowhere"], "does not exist"), ([small_corpus], "is not a finished model folder"),
             ([gpt2_teacher, bad_copy(gpt2_teacher, tmp_path, "other_tokenizer")], "another tokenizer"),
             ([bad_copy(gpt2_teacher, tmp_path, "nan")], "NaN or infinite")]
    for index, (teachers, needle) in enumerate(cases):
        out = tmp_path / f"student{index}"
        proc = run_script(*gpt2_args(small_corpus, out, 4, "--teachers", *teachers, "--distill_weight", 1))
        assert_one_line_error(proc, "--teachers", needle)
        assert not (out / "checkpoints").exists()
    tampered = bad_copy(simone_teacher, tmp_path, "tampered")
    assert_one_line_error(run_script(*gpt2_args(small_corpus, tmp_path / "t", 4, "--teachers", tampered,
                                                "--distill_weight", 1)), "--teachers", "hf_model.py differs")
    # --trust_folder_code passes the check (with a warning); the next check, the tokenizer's, refuses it.
    trusted = run_script(*gpt2_args(small_corpus, tmp_path / "t", 4, "--teachers", tampered, "--distill_weight", 1,
                                    "--trust_folder_code"))
    assert_one_line_error(trusted, "another tokenizer")
    assert "WARNING: --trust_folder_code: loading" in trusted.stdout
    # GPT-2's tokenizer is not SIM-ONE's (it keeps its quality seeds as single tokens).
    assert_one_line_error(run_script(*simone_args(small_corpus, tmp_path / "s", 4, "--teachers", gpt2_teacher,
                                                  "--distill_weight", 1)), "another tokenizer")
    assert_one_line_error(run_script(*gpt2_args(small_corpus, tmp_path / "w", 4, "--distill_weight", 1)),
                          "--distill_weight 1.0 needs --teachers")


# --------------------------------------------------------------------------- ensembles of folders


def test_an_ensemble_of_one_folder_scores_what_its_run_measured(small_corpus, gpt2_teacher):
    summary = json.loads((gpt2_teacher / "run_summary.json").read_text())
    config = json.loads((gpt2_teacher / "train_config.json").read_text())
    bpb = ensemble_bpb([gpt2_teacher], small_corpus, config["block_size"], config["eval_windows"],
                       folder_check("member"), config["batch_size"])
    assert bpb == pytest.approx(summary["final_val_bpb"], rel=1e-5, abs=0)


def test_an_ensemble_scores_no_worse_than_its_members_on_average(small_corpus, gpt2_teacher, tmp_path):
    """-log of a mean probability is at most the mean of the -logs (Jensen), token by token."""
    run_ok(*gpt2_args(small_corpus, tmp_path / "other", 12, "--seed", 8))
    members = [gpt2_teacher, tmp_path / "other"]
    alone = [evaluate_ensemble([m], small_corpus, 128, 16, folder_check("member"))["val_loss"] for m in members]
    together = evaluate_ensemble(members, small_corpus, 128, 16, folder_check("member"))["val_loss"]
    assert together <= sum(alone) / 2 and together != alone[0]
