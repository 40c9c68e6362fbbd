"""The fault suite, checkpoints: damaged or edited trainer state, malicious pickles (nothing is
unpickled), optimizer state of another shape, non-finite weights never saved, the step guard
(RELIABILITY.md lists what each proves)."""
import ast
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch

from conftest import REPO
from mvlm_engine.checkpoint import step_checkpoints
from mvlm_engine.errors import TrainingDiverged, UserError
from mvlm_engine.guard import StepGuard
from helpers.reliability import load, save, tiny_training_state


# --------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize("edit, needle", [
    (lambda s: s.pop("rng"), "'rng' is missing"),
    (lambda s: s.pop("data"), "'data' is missing"),
    (lambda s: s.update(step="10"), "'step' is not an int"),
    (lambda s: s.update(step=11), "changed after the checkpoint was written"),
    (lambda s: s.update(best_val_loss=None), "'best_val_loss' is not a float"),
])
def test_damaged_or_edited_trainer_state_is_refused(tmp_path, edit, needle):
    module, optimizer = tiny_training_state()
    folder = save(tmp_path / "best_model", module, optimizer)
    state = json.loads((folder / "trainer_state.json").read_text())
    edit(state)
    (folder / "trainer_state.json").write_text(json.dumps(state))
    with pytest.raises(UserError, match=re.escape(needle)) as err:
        load(folder, *tiny_training_state())
    assert "\n" not in str(err.value) and str(folder) in str(err.value)


@pytest.mark.parametrize("content", [b"", b"[1, 2]", b"\xff\xfe", b'{"step": 10}'])
def test_unreadable_trainer_state_is_one_line(tmp_path, content):
    folder = save(tmp_path / "step_000010", *tiny_training_state())
    (folder / "trainer_state.json").write_bytes(content)
    with pytest.raises(UserError, match="trainer_state.json is (unreadable|damaged)"):
        load(folder, *tiny_training_state())


def test_a_step_that_does_not_match_its_folder_is_refused(tmp_path):
    folder = save(tmp_path / "step_000010", *tiny_training_state())
    moved = folder.rename(tmp_path / "step_000012")
    with pytest.raises(UserError, match="'step' is 10 in the folder of step 12"):
        load(moved, *tiny_training_state())


class Payload:
    def __reduce__(self):
        return (os.system, (f"touch {PAYLOAD_MARKER}",))


PAYLOAD_MARKER = Path("/tmp") / f"mvlm-unpickled-{os.getpid()}"


@pytest.mark.parametrize("name", ["optimizer.pt", "rng_state.pt"])
def test_a_malicious_pickle_in_a_checkpoint_is_refused_and_never_runs(tmp_path, name):
    folder = save(tmp_path / "step_000010", *tiny_training_state())
    with open(folder / name, "wb") as handle:
        pickle.dump({"state": Payload()}, handle)
    torch.save({"state": {}, "param_groups": [], "evil": Payload()}, tmp_path / "evil.pt")
    PAYLOAD_MARKER.unlink(missing_ok=True)
    with pytest.raises(UserError, match="corrupt"):
        load(folder, *tiny_training_state())
    shutil.copy(tmp_path / "evil.pt", folder / name)  # the same payload in torch's own zip format
    with pytest.raises(UserError, match="corrupt"):
        load(folder, *tiny_training_state())
    assert not PAYLOAD_MARKER.exists()


def test_no_load_path_can_unpickle():
    """Every torch.load passes weights_only=True; nothing calls pickle, np.load(allow_pickle) or
    torch.load without it (tests excepted)."""
    offenders = []
    for path in list(REPO.glob("*.py")) + list(REPO.glob("mvlm_engine/*.py")) \
            + list(REPO.glob("SIM-ONE Training/**/*.py")) + list(REPO.glob("benchmarks/*.py")) \
            + list(REPO.glob("mvlm_training_dataset_complete/*.py")):
        text = path.read_text(encoding="utf-8")
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            if "weights_only=True" not in call:
                offenders.append(f"{path.name}: {call}")
        for bad in ("pickle.load", "pickle.loads", "allow_pickle=True", "dill.", "joblib.load"):
            if bad in text:
                offenders.append(f"{path.name}: {bad}")
    assert not offenders, offenders


def model_loads(tree) -> list:
    """Every call that loads model weights from a folder (X.from_pretrained of a model class, a
    text-generation pipeline), in the code and in code held in strings (a child interpreter's)."""
    calls = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and "from_pretrained(" in node.value:
            try:
                calls += model_loads(ast.parse(node.value))
            except SyntaxError:
                pass  # prose (a docstring, a model card's usage text), not code
        elif isinstance(node, ast.Call):
            name = ast.unparse(node.func)
            if (name.endswith("ForCausalLM.from_pretrained") or name == "pipeline") and node.args:
                calls.append(node)
    return calls


def test_every_model_load_is_safetensors_only():
    """A folder's weights never come from a pickled pytorch_model.bin: every model load in the
    repository passes use_safetensors=True (a pipeline: in its model_kwargs)."""
    offenders, seen = [], 0
    for path in list(REPO.glob("*.py")) + list(REPO.glob("mvlm_engine/*.py")) \
            + list(REPO.glob("SIM-ONE Training/**/*.py")) + list(REPO.glob("benchmarks/*.py")) \
            + list(REPO.glob("release/*.py")):
        for call in model_loads(ast.parse(path.read_text(encoding="utf-8"))):
            seen += 1
            if "'use_safetensors': True" not in ast.unparse(call) and "use_safetensors=True" not in ast.unparse(call):
                offenders.append(f"{path.name}: {ast.unparse(call)[:120]}")
    assert seen >= 6 and not offenders, offenders


def test_optimizer_state_of_another_shape_is_refused(tmp_path):
    folder = save(tmp_path / "step_000010", *tiny_training_state(64))
    with pytest.raises(UserError, match="corrupt or does not match"):
        load(folder, *tiny_training_state(32))
    saved = torch.load(folder / "optimizer.pt", weights_only=True)
    saved["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(saved, folder / "optimizer.pt")
    with pytest.raises(UserError, match="exp_avg of parameter 0 does not fit its shape"):
        load(folder, *tiny_training_state(64))


def test_non_finite_weights_are_never_checkpointed_and_the_last_good_one_is_named(tmp_path):
    module, optimizer = tiny_training_state()
    save(tmp_path / "step_000010", module, optimizer)
    with torch.no_grad():
        module[0].weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match=r"1 of [\d,]+ weights are NaN .*last good checkpoint is .*step_000010"):
        save(tmp_path / "step_000020", module, optimizer, step=20)
    assert [p.name for p in step_checkpoints(tmp_path)] == ["step_000010"]
    assert not list(tmp_path.glob(".tmp-*"))


# --------------------------------------------------------------------------- finite weights


def test_step_guard_puts_back_parameters_and_optimizer_state_exactly():
    module, optimizer = tiny_training_state()
    guard = StepGuard(module, optimizer)
    before = [t.clone() for t in guard._tensors()]
    guard.save()
    module(torch.randn(3, 64)).sum().backward()
    optimizer.param_groups[0]["lr"] = float("inf")
    optimizer.step()
    assert not bool(guard.weights_finite(torch.device("cpu")))
    guard.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, guard._tensors()))
    assert bool(guard.weights_finite(torch.device("cpu")))
    fresh = torch.nn.Linear(4, 4)  # the first step creates the state; undoing it removes it again
    fresh_optimizer = torch.optim.AdamW(fresh.parameters())
    first = StepGuard(fresh, fresh_optimizer)
    first.save()
    fresh(torch.randn(2, 4)).sum().backward()
    fresh_optimizer.step()
    first.restore()
    assert not fresh_optimizer.state


def muon_training_state(optimizer="muon"):
    """A module with Muon on its matrices and AdamW on its biases (an OptimizerSet), one step taken."""
    from mvlm_engine.config import TrainConfig
    from mvlm_engine.optim import build_optimizer
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))
    optimizer = build_optimizer(module, TrainConfig(optimizer=optimizer), torch.device("cpu"))
    module(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    return module, optimizer


def test_the_guard_and_checkpoints_cover_each_optimizer_of_a_muon_set(tmp_path):
    module, optimizer = muon_training_state()
    guard = StepGuard(module, optimizer)
    before = [t.clone() for t in guard._tensors()]
    assert len(before) == 4 + 2 + 2 * 3  # 4 parameters, Muon's 2 momenta, AdamW's step and moments of 2 biases
    guard.save()
    module(torch.randn(4, 8)).sum().backward()
    for group in optimizer.param_groups:
        group["lr"] = float("inf")
    optimizer.step()
    assert not bool(guard.weights_finite(torch.device("cpu")))
    guard.restore()
    assert all(torch.equal(a, b) for a, b in zip(before, guard._tensors()))
    folder = save(tmp_path / "step_000010", module, optimizer)
    load(folder, *muon_training_state())
    with pytest.raises(UserError, match="optimizer.pt was saved by another --optimizer"):
        load(folder, *muon_training_state("adamw"))


def test_a_step_that_makes_a_weight_non_finite_is_skipped(small_corpus, tmp_path, monkeypatch, capsys):
    from helpers.bigram import run
    real_step, calls = torch.optim.AdamW.step, []

    def poisoned_step(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls.append(1)
        if len(calls) in (3, 4):  # as a huge update would: one weight overflows
            with torch.no_grad():
                self.param_groups[0]["params"][0].view(-1)[0] = float("inf")
        return result
    monkeypatch.setattr(torch.optim.AdamW, "step", poisoned_step)
    objective, summary, history = run(small_corpus, tmp_path, bad_calls=set())
    assert summary["status"] == "complete" and torch.isfinite(objective.table.weight).all()
    assert [r["step"] for r in history["train"]] == [1, 2, 5, 6, 7, 8, 9, 10, 11, 12]
    assert "step 2: the update made weights non-finite, step skipped (1/3)" in capsys.readouterr().out
