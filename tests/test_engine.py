"""Shared engine pieces not covered end to end: the schedule and non-finite loss handling."""
import json
import math

import pytest
import torch

from mvlm_engine.config import TrainConfig, from_dict
from mvlm_engine.data import BlockSampler
from mvlm_engine.errors import UserError
from mvlm_engine.runtime import start_runtime
from mvlm_engine.schedule import get_lr
from mvlm_engine.trainer import LMBatches, TrainingTask, fit, prepare_token_data


def test_schedule_warms_up_then_decays_to_the_floor():
    lrs = [get_lr(s, 1e-3, 10, 100, 0.1) for s in range(120)]
    assert lrs[0] == pytest.approx(1e-4) and lrs[9] == pytest.approx(1e-3)
    assert all(a >= b for a, b in zip(lrs[10:100], lrs[11:101]))  # cosine only goes down
    assert lrs[55] == pytest.approx(1e-4 + 0.5 * 0.9e-3)  # halfway through the decay
    assert lrs[100] == lrs[119] == pytest.approx(1e-4)


def test_config_rejects_unknown_keys():
    with pytest.raises(UserError, match="unknown TrainConfig key"):
        from_dict(TrainConfig, {"batch_size": 2, "batchsize": 3})


class BigramObjective(torch.nn.Module):
    """A tiny next-token model whose loss turns non-finite on chosen steps."""

    def __init__(self, vocab: int, bad_calls: set):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)
        self.bad_calls, self.calls = bad_calls, 0

    def logits(self, x):
        return self.table(x)

    def forward(self, batch):
        loss = torch.nn.functional.cross_entropy(self.logits(batch["input_ids"]).flatten(0, 1),
                                                 batch["labels"].flatten())
        self.calls += 1
        if self.calls in self.bad_calls:
            loss = loss * float("nan")
        return loss, {"loss/accuracy": loss}


def run(small_corpus, tmp_path, bad_calls, steps=12):
    cfg = TrainConfig(data_dir=str(small_corpus), output_dir=str(tmp_path / "out"), vocab_size=512, block_size=32,
                      batch_size=4, max_steps=steps, learning_rate=1e-2, warmup_steps=2, log_interval=1,
                      eval_interval=steps, save_interval=steps, eval_windows=4, device="cpu", max_bad_steps=3)
    runtime = start_runtime("cpu", "fp32", False)
    data = prepare_token_data(cfg, runtime)
    objective = BigramObjective(data.tokenizer.get_vocab_size(), bad_calls)
    sampler = BlockSampler(data.shards.tokens("train"), cfg.block_size, cfg.batch_size, cfg.seed)
    task = TrainingTask("bigram", objective, lambda m, x: m.logits(x), LMBatches(sampler), 1.0,
                        export=lambda out: None, config={"model": "bigram"})
    return objective, fit(cfg, task, runtime, data), json.loads((tmp_path / "out" / "training_history.json").read_text())


def test_non_finite_steps_are_skipped_and_training_goes_on(small_corpus, tmp_path, capsys):
    objective, summary, history = run(small_corpus, tmp_path, bad_calls={4, 5})
    assert summary["status"] == "complete" and math.isfinite(summary["final_val_loss"])
    logged_steps = [r["step"] for r in history["train"]]
    assert 4 not in logged_steps and 5 not in logged_steps and 12 in logged_steps  # skipped steps log nothing
    assert all(math.isfinite(r["loss"]) for r in history["train"])
    assert torch.isfinite(objective.table.weight).all()
    assert "non-finite loss or gradients, step skipped (2/3)" in capsys.readouterr().out


def test_a_loss_that_stays_non_finite_stops_the_run(small_corpus, tmp_path):
    with pytest.raises(UserError, match="not finite for 3 steps in a row"):
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
