"""Weight averaging (--ema_decay): the debiased EMA in closed form, what evaluation, best_model
and the export see, exact resume, and checkpoints without or with a damaged average."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

import conftest
from conftest import SIMONE_TRAINER, assert_same_weights, run_script
from mvlm_engine.averaging import AVERAGE_FILE, WeightAverage
from mvlm_engine.config import TrainConfig
from mvlm_engine.data import BlockSampler, LMBatches
from mvlm_engine.ensemble import evaluate_ensemble
from release.trust import folder_check
from mvlm_engine.errors import UserError
from mvlm_engine.evaluation import evaluate
from mvlm_engine.runtime import start_runtime
from mvlm_engine.shards import prepare_token_data
from mvlm_engine.trainer import TrainingTask, fit

TIMING_KEYS = {"tokens_per_s", "mfu"}


class RecordingBigram(torch.nn.Module):
    """A next-token table that records the weights each forward call sees (those after the
    previous optimizer step), with a non-finite loss on chosen calls; `ascend_after` calls in,
    it climbs its training loss, so the held-out loss turns up as it does once a model overfits."""

    def __init__(self, vocab: int, bad_calls=(), ascend_after: int | None = None):
        super().__init__()
        self.table = torch.nn.Embedding(vocab, vocab)
        self.bad_calls, self.ascend_after, self.calls, self.seen = set(bad_calls), ascend_after, 0, []

    def logits(self, x):
        return self.table(x)

    def forward(self, batch):
        self.calls += 1
        self.seen.append(self.table.weight.detach().clone())
        loss = torch.nn.functional.cross_entropy(self.logits(batch["input_ids"]).flatten(0, 1),
                                                 batch["labels"].flatten())
        if self.calls in self.bad_calls:
            loss = loss * float("nan")
        if self.ascend_after is not None and self.calls > self.ascend_after:
            loss = -loss
        return loss, {}


def engine_run(small_corpus, out, steps=10, objective_options=None, **settings):
    """A real `fit` of a RecordingBigram; returns (objective, summary, history, exported table)."""
    cfg = TrainConfig(**{**dict(data_dir=str(small_corpus), output_dir=str(out), vocab_size=512, block_size=32,
                                batch_size=4, max_steps=steps, learning_rate=1e-2, warmup_steps=2, log_interval=1,
                                eval_interval=steps, save_interval=steps, eval_windows=4, device="cpu",
                                max_bad_steps=3), **settings})
    runtime = start_runtime("cpu", "fp32", cfg.compile)
    data = prepare_token_data(cfg, runtime)
    torch.manual_seed(cfg.seed)
    objective = RecordingBigram(data.tokenizer.get_vocab_size(), **(objective_options or {}))
    exported = []
    task = TrainingTask("bigram", objective, lambda m, x: m.logits(x),
                        LMBatches(BlockSampler(data.shards.tokens("train"), cfg.block_size, cfg.batch_size, cfg.seed)),
                        1.0, export=lambda _: exported.append(objective.table.weight.detach().clone()), config=cfg)
    summary = fit(cfg, task, runtime, data)
    return objective, summary, json.loads((out / "training_history.json").read_text()), exported[0], (cfg, data)


def checkpoint_tables(folder):
    """(raw weights, averaged weights, trainer state) of a checkpoint of the bigram."""
    state = json.loads((folder / "trainer_state.json").read_text())
    return (load_file(str(folder / "model.safetensors"))["table.weight"],
            load_file(str(folder / AVERAGE_FILE))["table.weight"], state)


def debiased_ema(weights: list[torch.Tensor], decay: float) -> torch.Tensor:
    """By hand: sum_i (1 - d) d^(n - i) W_i / (1 - d^n) over the n folded-in weights, in float64."""
    n = len(weights)
    total = sum((1 - decay) * decay ** (n - i) * w.double() for i, w in enumerate(weights, 1))
    return total / (1 - decay ** n)


def test_the_average_is_the_debiased_ema_of_the_applied_steps(small_corpus, tmp_path):
    """decay 0.7 from step 2 on, step 5 non-finite (skipped): the average folds in the weights
    after steps 3, 4, 6, ..., 10 and nothing else."""
    objective, summary, history, exported, _ = engine_run(
        small_corpus, tmp_path / "out", steps=10, objective_options={"bad_calls": {5}}, ema_decay=0.7,
        ema_start_step=2, export_weights="last")
    raw, averaged, state = checkpoint_tables(tmp_path / "out" / "checkpoints" / "step_000010")
    after_step = [*objective.seen[1:], raw]  # after_step[s - 1]: the weights after step s
    assert torch.equal(after_step[4], after_step[3])  # step 5 was undone
    folded = [after_step[s - 1] for s in (3, 4, 6, 7, 8, 9, 10)]
    assert state["average"] == {"decay": 0.7, "start_step": 2, "updates": 7}
    torch.testing.assert_close(averaged.double(), debiased_ema(folded, 0.7), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(averaged, raw)  # it is not simply the last weights
    assert torch.equal(exported, averaged)  # --export_weights last: the final average


def test_evaluation_sees_the_average_and_training_the_raw_weights(small_corpus, tmp_path):
    objective, summary, history, exported, (cfg, data) = engine_run(small_corpus, tmp_path / "out", steps=8,
                                                                    ema_decay=0.8, export_weights="last")
    raw, averaged, _ = checkpoint_tables(tmp_path / "out" / "checkpoints" / "step_000008")
    tokens, lengths = data.shards.tokens("val"), torch.as_tensor(data.byte_lengths)
    runtime = start_runtime("cpu", "fp32", False)

    def held_out(table):
        probe = RecordingBigram(len(table))
        probe.table.weight.data.copy_(table)
        return evaluate(probe, lambda m, x: m.logits(x), tokens, cfg.block_size, cfg.eval_windows, cfg.batch_size,
                        runtime, lengths)

    assert history["eval"][-1]["val_loss"] == held_out(averaged)["val_loss"] != held_out(raw)["val_loss"]
    assert summary["final_val_loss"] == history["eval"][-1]["val_loss"]
    # The evaluation at step 4 swapped the average in and the raw weights back: step 5 trained on the raw ones.
    engine_run(small_corpus, tmp_path / "again", steps=8, ema_decay=0.8, eval_interval=4, export_weights="last")
    raw_again, averaged_again, _ = checkpoint_tables(tmp_path / "again" / "checkpoints" / "step_000008")
    assert torch.equal(raw_again, raw) and torch.equal(averaged_again, averaged)


def test_best_model_and_the_export_carry_the_average_of_the_best_evaluation(small_corpus, tmp_path):
    _, summary, history, exported, _ = engine_run(
        small_corpus, tmp_path / "out", steps=16, objective_options={"ascend_after": 6}, learning_rate=0.5,
        eval_interval=2, ema_decay=0.5)
    evals = {e["step"]: e["val_loss"] for e in history["eval"]}
    best_step = min(evals, key=evals.get)
    assert best_step < 16 and summary["exported_step"] == best_step
    assert summary["final_val_loss"] == evals[best_step]
    best_raw, best_averaged, best_state = checkpoint_tables(tmp_path / "out" / "checkpoints" / "best_model")
    assert best_state["step"] == best_step and best_state["average"]["updates"] == best_step
    assert torch.equal(exported, best_averaged) and not torch.equal(exported, best_raw)


def history_after(history: dict, step: int) -> dict:
    """The records after `step` (those a resumed run writes itself), without wall-clock timings."""
    return {kind: [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in history[kind] if r["step"] > step]
            for kind in ("train", "eval")}


def test_resume_with_an_average_is_exact(small_corpus, tmp_path):
    common = dict(steps=12, save_interval=6, eval_interval=6, ema_decay=0.9, ema_start_step=1)
    _, summary, history, exported, _ = engine_run(small_corpus, tmp_path / "full", **common)
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000006",
                    tmp_path / "resumed" / "checkpoints" / "step_000006")
    _, summary_r, history_r, exported_r, _ = engine_run(small_corpus, tmp_path / "resumed", resume_from="latest",
                                                        **common)
    for name in ("model.safetensors", AVERAGE_FILE):
        assert_same_weights(tmp_path / "full" / "checkpoints" / "step_000012" / name,
                            tmp_path / "resumed" / "checkpoints" / "step_000012" / name)
    assert torch.equal(exported, exported_r)
    assert history_after(history, 6) == history_after(history_r, 6) and history_after(history, 6)["eval"]
    assert summary["final_val_loss"] == summary_r["final_val_loss"]


def test_a_checkpoint_without_an_average_starts_it_there(small_corpus, tmp_path, capsys):
    engine_run(small_corpus, tmp_path / "out", steps=6)  # no averaging
    objective, *_ = engine_run(small_corpus, tmp_path / "out", steps=10, ema_decay=0.6, resume_from="latest",
                               export_weights="last")
    assert "the checkpoint holds no weight average: it starts after step 6" in capsys.readouterr().out
    raw, averaged, state = checkpoint_tables(tmp_path / "out" / "checkpoints" / "step_000010")
    assert state["average"] == {"decay": 0.6, "start_step": 6, "updates": 4}
    after_step = [*objective.seen[1:], raw]  # the resumed run's forward calls see the weights after steps 6..9
    torch.testing.assert_close(averaged.double(), debiased_ema(after_step, 0.6), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("damage", ["missing", "truncated", "other_shape"])
def test_a_damaged_average_is_refused_in_one_line(small_corpus, tmp_path, damage):
    engine_run(small_corpus, tmp_path / "out", steps=4, ema_decay=0.5)
    path = tmp_path / "out" / "checkpoints" / "step_000004" / AVERAGE_FILE
    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[:100])
    else:
        from safetensors.torch import save_file
        save_file({"table.weight": torch.zeros(3, 3)}, str(path), metadata=None)
    with pytest.raises(UserError) as err:
        engine_run(small_corpus, tmp_path / "out", steps=8, ema_decay=0.5, resume_from="latest")
    message = str(err.value)
    assert "\n" not in message and "step_000004" in message and "resume from another checkpoint" in message


def test_the_average_follows_the_parameters_in_fp32_without_touching_them():
    module = torch.nn.Linear(3, 2).to(torch.bfloat16)
    average = WeightAverage(module, decay=0.5)
    assert all(t.dtype == torch.float32 for t in average.averaged)
    before = [p.detach().clone() for p in module.parameters()]
    average.update(1)
    with torch.no_grad():
        module.weight.add_(1.0)
    average.update(2)
    with average.swapped_in():
        torch.testing.assert_close(module.weight.float(), average.averaged[0].to(torch.bfloat16).float())
    assert torch.equal(module.weight, before[0] + 1.0) and torch.equal(module.bias, before[1])
    # updates 1 and 2 by hand: copy, then (W + (W + 1)) / 2 weighted 1/(1 + d) and d/(1 + d)
    expected = (0.5 * before[0].float() + (before[0] + 1.0).float()) / 1.5
    torch.testing.assert_close(average.averaged[0], expected)


def simone_args(data_dir, out, *extra):
    return conftest.tiny_args(SIMONE_TRAINER, data_dir, out, "--batch_size", 8, "--max_steps", 16,
                              "--save_interval", 8, "--eval_interval", 8, "--log_interval", 4, "--keep_checkpoints",
                              5, "--ema_decay", 0.9, *extra, seed=3)


def test_simone_resumes_exactly_with_an_average_and_exports_what_it_evaluated(small_corpus, tmp_path):
    full = run_script(*simone_args(small_corpus, tmp_path / "full"))
    assert full.returncode == 0, full.stderr[-3000:]
    (tmp_path / "resumed" / "checkpoints").mkdir(parents=True)
    shutil.copytree(tmp_path / "full" / "checkpoints" / "step_000008",
                    tmp_path / "resumed" / "checkpoints" / "step_000008")
    resumed = run_script(*simone_args(small_corpus, tmp_path / "resumed", "--resume_from", "latest"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "full" / "model.safetensors", tmp_path / "resumed" / "model.safetensors")
    for name in ("model.safetensors", AVERAGE_FILE):
        assert_same_weights(tmp_path / "full" / "checkpoints" / "step_000016" / name,
                            tmp_path / "resumed" / "checkpoints" / "step_000016" / name)
    histories = [json.loads((tmp_path / run / "training_history.json").read_text()) for run in ("full", "resumed")]
    assert history_after(histories[0], 8) == history_after(histories[1], 8)
    # The exported folder holds the weights the trainer evaluated: an ensemble of it alone scores the same.
    summary = json.loads((tmp_path / "full" / "run_summary.json").read_text())
    config = json.loads((tmp_path / "full" / "train_config.json").read_text())
    alone = evaluate_ensemble([tmp_path / "full"], small_corpus, config["block_size"], config["eval_windows"],
                              folder_check("member"), config["batch_size"])
    assert alone["val_bpb"] == pytest.approx(summary["final_val_bpb"], rel=1e-5, abs=0)
    assert alone["val_loss"] == pytest.approx(summary["final_val_loss"], rel=1e-5, abs=0)


def test_ddp_keeps_the_average_of_the_same_global_batch(small_corpus, tmp_path):
    """Two processes (gloo) average the parameters they agree on: rank 0's saved average is one process's."""
    import os
    import subprocess
    import sys
    common = ["--max_steps", 6, "--log_interval", 1, "--eval_interval", 6, "--save_interval", 6, "--ema_decay", 0.8,
              *conftest.GPT2_NO_DROPOUT_FLAGS]
    conftest.run_ok(*conftest.tiny_args(conftest.GPT2_TRAINER, small_corpus, tmp_path / "one", *common,
                                        "--batch_size", 8))
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
                          *map(str, conftest.tiny_args(conftest.GPT2_TRAINER, small_corpus, tmp_path / "two", *common,
                                                       "--batch_size", 4))],
                         cwd=conftest.REPO, capture_output=True, text=True, timeout=conftest.TIMEOUT,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one, two = (load_file(str(tmp_path / run / "checkpoints" / "step_000006" / AVERAGE_FILE)) for run in ("one", "two"))
    assert one.keys() == two.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], rtol=1e-4, atol=1e-5)
