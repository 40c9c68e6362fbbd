"""Shared engine pieces not covered end to end: settings, the schedule, non-finite loss handling."""
import io
import json
import math

import pytest
import torch

from mvlm_engine.cli import parse_run_config
from mvlm_engine.config import TrainConfig, build_config
from mvlm_engine.errors import TrainingDiverged, UserError
from mvlm_engine.optim import lr_factor
from helpers.bigram import BigramObjective, run


def test_schedule_warms_up_then_decays_to_the_floor_at_the_last_step():
    lrs = [1e-3 * lr_factor(s, 10, 100, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a > b for a, b in zip(lrs[9:99], lrs[10:100]))  # cosine only goes down
    assert lrs[54] == pytest.approx(1e-4 + 0.5 * 0.9e-3)  # halfway through the decay: the end of step 54
    assert lrs[99] == lrs[100] == lrs[119] == pytest.approx(1e-4)  # step 99 is the run's last


def test_wsd_schedule_is_flat_then_decays_linearly_to_the_floor():
    factors = [lr_factor(s, 10, 100, 0.1, "wsd", decay_fraction=0.2) for s in range(100)]
    assert factors[9] == 1.0 and set(factors[10:80]) == {1.0}  # stable until the last 20% of the steps
    assert factors[80] == pytest.approx(1 - 0.9 / 20) and factors[89] == pytest.approx(0.55)
    assert all(a > b for a, b in zip(factors[79:99], factors[80:100]))
    assert factors[99] == lr_factor(100, 10, 100, 0.1, "wsd") == pytest.approx(0.1)


class TinyLM(torch.nn.Module):
    """An embedding, two hidden matrices, a gain, a bare 2-D parameter and an output head."""

    def __init__(self, tied: bool):
        super().__init__()
        self.embed = torch.nn.Embedding(50, 16)
        self.hidden = torch.nn.Sequential(torch.nn.Linear(16, 32, bias=False), torch.nn.Linear(32, 16))
        self.gain = torch.nn.Parameter(torch.ones(16))
        self.slots = torch.nn.Parameter(torch.randn(3, 16))
        self.head = torch.nn.Linear(16, 50, bias=False)
        self.head.is_output_head = True
        if tied:
            self.head.weight = self.embed.weight

    def forward(self, x):
        h = self.hidden(self.embed(x) + self.slots.mean(0)) * self.gain
        return self.head(h)


@pytest.mark.parametrize("tied", [True, False])
def test_muon_takes_only_the_hidden_matrices(tied):
    from mvlm_engine.optim import build_optimizer, hidden_matrices
    model = TinyLM(tied)
    assert [id(p) for p in hidden_matrices(model)] == [id(model.hidden[0].weight), id(model.hidden[1].weight)]
    cfg = TrainConfig(optimizer="muon", learning_rate=1e-3, muon_lr=0.02, head_lr=4e-3, scalar_lr=5e-3)
    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    muon, adamw = optimizer.optimizers
    assert isinstance(muon, torch.optim.Muon) and isinstance(adamw, torch.optim.AdamW)
    groups = [{id(p) for p in g["params"]} for g in adamw.param_groups]
    matrices, scalars = {id(model.embed.weight), id(model.slots)}, {id(model.gain), id(model.hidden[1].bias)}
    if tied:  # the head is the embedding: it trains as one
        assert groups == [matrices, scalars]
        assert [g["peak_lr"] for g in optimizer.param_groups] == [0.02, 1e-3, 5e-3]
    else:
        assert groups == [{id(model.head.weight)}, matrices, scalars]
        assert [g["peak_lr"] for g in optimizer.param_groups] == [0.02, 4e-3, 1e-3, 5e-3]


def test_muon_state_round_trips_exactly():
    from mvlm_engine.optim import build_optimizer
    torch.manual_seed(0)
    cfg = TrainConfig(optimizer="muon")
    model, x = TinyLM(tied=False), torch.randint(0, 50, (4, 7))

    def train(model, optimizer, steps):
        for _ in range(steps):
            torch.nn.functional.cross_entropy(model(x).flatten(0, 1), x.flatten()).backward()
            optimizer.step()
            optimizer.zero_grad()

    optimizer = build_optimizer(model, cfg, torch.device("cpu"))
    train(model, optimizer, 3)
    copy = TinyLM(tied=False)
    copy.load_state_dict(model.state_dict())
    copy_optimizer = build_optimizer(copy, cfg, torch.device("cpu"))
    saved = io.BytesIO()  # through the bytes a checkpoint holds, read back without unpickling
    torch.save(optimizer.state_dict(), saved)
    copy_optimizer.load_state_dict(torch.load(io.BytesIO(saved.getvalue()), weights_only=True))
    train(model, optimizer, 3)
    train(copy, copy_optimizer, 3)
    for a, b in zip(model.parameters(), copy.parameters()):
        assert torch.equal(a, b)


def test_fp32_newton_schulz_on_cpu_matches_torchs_bf16_iteration():
    from torch.optim import _muon

    from mvlm_engine.optim import use_fp32_newton_schulz_on_cpu
    use_fp32_newton_schulz_on_cpu()
    original = _muon._zeropower_via_newtonschulz.__closure__[0].cell_contents  # torch's own, kept inside
    grad = torch.randn(48, 24, generator=torch.Generator().manual_seed(0))
    ours = _muon._zeropower_via_newtonschulz(grad, (3.4445, -4.775, 2.0315), 5, 1e-7)
    theirs = original(grad, (3.4445, -4.775, 2.0315), 5, 1e-7).float()
    assert ours.dtype == torch.float32 and ours.shape == grad.shape
    assert (ours - theirs).abs().max() < 0.02 and ours.abs().mean() > 0.1


def test_config_rejects_unknown_keys_and_bad_types_all_at_once():
    with pytest.raises(UserError) as err:
        build_config(TrainConfig, {"batch_size": "16", "batchsize": 3, "learning_rate": float("nan"),
                                   "precision": "fp8"})
    message = str(err.value)
    assert "unknown TrainConfig key(s): batchsize" in message
    assert "--batch_size must be an int, got '16'" in message
    assert "--learning_rate must be a finite number, got nan" in message
    assert "--precision must be one of auto, bf16, fp16, fp32, got 'fp8'" in message


def resolve_gpt2(argv):
    import mvlm_trainer
    return parse_run_config(mvlm_trainer.GPT2RunConfig, argv, "mvlm_trainer.py", "")


def test_settings_resolve_default_then_preset_then_file_then_flag(tmp_path):
    default = resolve_gpt2([])
    assert (default.learning_rate, default.model.n_layer, default.batch_size) == (6e-4, 12, 16)
    tiny = resolve_gpt2(["--preset", "tiny"])
    assert (tiny.learning_rate, tiny.model.n_layer, tiny.max_steps) == (3e-3, 2, 300)
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"preset": "tiny", "learning_rate": 1e-3, "model": {"n_layer": 3}}))
    from_file = resolve_gpt2(["--config", str(config_file)])
    assert (from_file.learning_rate, from_file.model.n_layer, from_file.max_steps) == (1e-3, 3, 300)
    flagged = resolve_gpt2(["--config", str(config_file), "--learning_rate", "5e-4", "--n_layer", "4"])
    assert (flagged.learning_rate, flagged.model.n_layer, flagged.max_steps) == (5e-4, 4, 300)


def test_bad_settings_are_collected_into_one_error(tmp_path):
    with pytest.raises(UserError) as err:
        resolve_gpt2(["--batch_size", "0", "--learning_rate", "inf", "--n_embd", "100", "--n_head", "3"])
    message = str(err.value)
    assert "--learning_rate must be a finite number" in message
    config_file = tmp_path / "run.json"
    config_file.write_text(json.dumps({"overwrite": True}))
    with pytest.raises(UserError, match="overwrite is an action for one run"):
        resolve_gpt2(["--config", str(config_file)])
    with pytest.raises(UserError) as err:
        resolve_gpt2(["--batch_size", "0", "--n_embd", "100", "--n_head", "3"])
    assert "--batch_size must be > 0" in str(err.value) and "must be divisible by --n_head" in str(err.value)


class WorseningBigram(BigramObjective):
    """Learns for `descend` micro-steps, then ascends its training loss: the held-out loss rises
    from there, as it does once a model overfits."""

    def __init__(self, vocab: int, descend: int):
        super().__init__(vocab, set())
        self.descend = descend

    def forward(self, batch):
        loss, parts = super().forward(batch)
        return (loss if self.calls <= self.descend else -loss), parts


def worsening_run(small_corpus, tmp_path, **settings):
    exported = []
    objective, summary, history = run(small_corpus, tmp_path, set(), steps=16, exported=exported, eval_interval=2,
                                      learning_rate=0.5, make_objective=lambda v: WorseningBigram(v, descend=6),
                                      **settings)
    evals = {e["step"]: e["val_loss"] for e in history["eval"]}
    return objective, summary, evals, exported[0]


def test_the_exported_model_carries_the_weights_of_the_lowest_held_out_loss(small_corpus, tmp_path, capsys):
    from safetensors.torch import load_file
    objective, summary, evals, exported = worsening_run(small_corpus, tmp_path)
    best_step = min(evals, key=evals.get)
    assert best_step < 16 and evals[16] > evals[best_step]  # it got worse after learning
    assert summary["exported_step"] == best_step and summary["final_val_loss"] == pytest.approx(evals[best_step])
    assert summary["last_val_loss"] == pytest.approx(evals[16]) and summary["steps"] == 16
    best = load_file(str(tmp_path / "out" / "checkpoints" / "best_model" / "model.safetensors"))
    last = load_file(str(tmp_path / "out" / "checkpoints" / "step_000016" / "model.safetensors"))
    assert torch.equal(exported, best["table.weight"]) and not torch.equal(exported, last["table.weight"])
    assert f"exporting the weights of step {best_step}" in capsys.readouterr().out


def test_export_weights_last_keeps_the_last_step(small_corpus, tmp_path):
    from safetensors.torch import load_file
    _, summary, evals, exported = worsening_run(small_corpus, tmp_path, export_weights="last")
    last = load_file(str(tmp_path / "out" / "checkpoints" / "step_000016" / "model.safetensors"))
    assert torch.equal(exported, last["table.weight"])
    assert summary["exported_step"] == 16 and summary["final_val_loss"] == pytest.approx(evals[16])


def test_early_stopping_ends_the_run_after_patience_evaluations_without_a_new_best(small_corpus, tmp_path):
    _, summary, evals, _ = worsening_run(small_corpus, tmp_path, early_stop_patience=2)
    best_step = min(evals, key=evals.get)
    assert max(evals) == best_step + 4 < 16  # two evaluations without a new best, then the end
    assert summary["early_stopped"] and summary["steps"] == best_step + 4
    assert summary["exported_step"] == best_step
    assert (tmp_path / "out" / "checkpoints" / f"step_{best_step + 4:06d}").is_dir()  # resumable: it is finished


def test_non_finite_steps_are_skipped_and_training_goes_on(small_corpus, tmp_path, capsys):
    objective, summary, history = run(small_corpus, tmp_path, bad_calls={4, 5})
    assert summary["status"] == "complete" and math.isfinite(summary["final_val_loss"])
    logged_steps = [r["step"] for r in history["train"]]
    assert 4 not in logged_steps and 5 not in logged_steps and 12 in logged_steps  # skipped steps log nothing
    assert all(math.isfinite(r["loss"]) for r in history["train"])
    assert torch.isfinite(objective.table.weight).all()
    assert "non-finite loss or gradients, step skipped (2/3)" in capsys.readouterr().out


def test_a_loss_that_stays_non_finite_stops_the_run(small_corpus, tmp_path):
    with pytest.raises(TrainingDiverged, match="not finite for 3 steps in a row"):
        run(small_corpus, tmp_path, bad_calls=set(range(3, 100)))


def test_checkpoint_swap_recovery_and_abandoned_checkpoints(tmp_path):
    from mvlm_engine.checkpoint import recover_interrupted_swaps, set_aside_later_checkpoints, step_checkpoints
    root = tmp_path / "checkpoints"
    for name in ("step_000010", "step_000020", "step_000030", ".old-best_model", ".tmp-step_000040"):
        (root / name).mkdir(parents=True)
        (root / name / "marker").write_text(name)
    recover_interrupted_swaps(root)  # a crash between the two renames of best_model
    assert (root / "best_model" / "marker").read_text() == ".old-best_model"
    assert not (root / ".tmp-step_000040").exists()
    moved = set_aside_later_checkpoints(root, root / "step_000010", 10)
    assert [p.name for p in moved] == ["step_000020", "step_000030"]
    assert [p.name for p in step_checkpoints(root)] == ["step_000010"]
    assert len(list((root / "abandoned").iterdir())) == 2  # kept, not deleted


def test_compile_mode_reaches_torch_compile(small_corpus, tmp_path, monkeypatch):
    import mvlm_engine.trainer as trainer
    seen = []
    monkeypatch.setattr(trainer.torch, "compile", lambda model, **options: seen.append(options) or model)
    _, summary, _ = run(small_corpus, tmp_path, set(), steps=2, compile=True, compile_mode="max-autotune-no-cudagraphs")
    assert seen == [{"mode": "max-autotune-no-cudagraphs"}] and summary["compile"] is True
