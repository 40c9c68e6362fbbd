"""Running out of GPU memory, on a CPU: torch.OutOfMemoryError raised from a training step (and from
the held-out evaluation) of either trainer ends the run with one line that names the micro-batch and
the flags that shrink it at the same tokens per step, and leaves the last checkpoint as it was: a
resume from it finishes the run."""
import sys

import pytest
import torch

from conftest import GPT2_TRAINER, REPO, SIMONE_TRAINER, import_script, tiny_args
from mvlm_engine.cli import run_cli
from mvlm_engine.packaging import RUN_SUMMARY

pytestmark = pytest.mark.e2e  # trains tiny models
TRAINERS = {"gpt2": GPT2_TRAINER, "simone": SIMONE_TRAINER}
SETTINGS = ("--max_steps", 6, "--batch_size", 8, "--block_size", 64, "--save_interval", 2, "--eval_interval", 3,
            "--eval_windows", 4, "--log_interval", 1)


@pytest.fixture(scope="module")
def mains():
    sys.path.insert(0, str(REPO / "SIM-ONE Training"))
    return {name: import_script(path, f"oom_{name}") for name, path in TRAINERS.items()}


def run_main(main, prog, argv, capsys):
    with pytest.raises(SystemExit) as exit_status:
        run_cli(prog, main, [str(a) for a in argv])
    return exit_status.value.code or 0, capsys.readouterr().err


def raise_at_call(monkeypatch, owner, name, call: int):
    """owner.name raises torch.OutOfMemoryError at its `call`-th call (from 1)."""
    original, calls = getattr(owner, name), []

    def wrapped(*args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return original(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapped)


@pytest.mark.parametrize("trainer", sorted(TRAINERS))
@pytest.mark.parametrize("where", ["a training step", "the held-out evaluation"])
def test_out_of_memory_is_one_line_naming_the_micro_batch_and_the_checkpoint_stays_good(
        trainer, where, mains, small_corpus, tmp_path, monkeypatch, capsys):
    import mvlm_engine.trainer
    out = tmp_path / "run"
    args = tiny_args(TRAINERS[trainer], small_corpus, out, *SETTINGS)[1:]
    with monkeypatch.context() as patch:
        if where == "a training step":  # the backward pass of step 5 (one micro-batch per step)
            raise_at_call(patch, torch.autograd, "backward", 5)
        else:  # the evaluation of step 6 (the one at step 3 ran)
            raise_at_call(patch, mvlm_engine.trainer, "evaluate", 2)
        code, stderr = run_main(mains[trainer].main, trainer, args, capsys)
    lines = [line for line in stderr.splitlines() if line.strip() and "%|" not in line]
    assert code == 1 and len(lines) == 1 and "Traceback" not in stderr, stderr
    line = lines[0]
    assert f"out of GPU memory in {where}, at a micro-batch of 8 x 64 tokens (--batch_size 8, --block_size 64" in line
    assert "pass --batch_size 4 --gradient_accumulation_steps 2 to keep the 512 tokens per step" in line, line
    assert f"the last good checkpoint, {out / 'checkpoints' / 'step_000004'}, is untouched" in line, line
    assert "--resume_from latest" in line
    checkpoints = out / "checkpoints"
    assert not [p.name for p in checkpoints.iterdir() if p.name.startswith((".tmp-", ".old-"))]
    assert not (checkpoints / "step_000006").exists() and not (out / RUN_SUMMARY).exists()
    code, stderr = run_main(mains[trainer].main, trainer, [*args, "--resume_from", "latest"], capsys)
    assert code == 0, stderr[-2000:]  # the checkpoint the line named is whole: the run finishes from it
    assert (out / RUN_SUMMARY).is_file()


def test_one_sequence_per_micro_batch_says_to_lower_the_block_size_or_the_model():
    from types import SimpleNamespace

    from mvlm_engine.memory import out_of_memory_line, smaller_micro_batch
    assert smaller_micro_batch(6, 2) == (3, 4) and smaller_micro_batch(7, 1) == (1, 7) and smaller_micro_batch(1, 4) is None
    cfg = SimpleNamespace(batch_size=1, block_size=2048, gradient_accumulation_steps=8)
    line = out_of_memory_line(MemoryError(), cfg, "a training step", 1, REPO / "no_such_folder")
    assert "out of memory in a training step" in line and "--batch_size is 1 already; lower --block_size" in line
    assert "no checkpoint was written yet" in line
