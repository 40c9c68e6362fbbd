"""A tiny bigram model trained through the engine's real loop (fit), for tests of its step handling."""
import json

import torch

from mvlm_engine.config import TrainConfig
from mvlm_engine.data import BlockSampler, LMBatches
from mvlm_engine.runtime import start_runtime
from mvlm_engine.shards import prepare_token_data
from mvlm_engine.trainer import TrainingTask, fit


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


def run(small_corpus, tmp_path, bad_calls, steps=12, make_objective=None, exported=None, **settings):
    cfg = TrainConfig(**{**dict(data_dir=str(small_corpus), output_dir=str(tmp_path / "out"), vocab_size=512,
                                block_size=32, batch_size=4, max_steps=steps, learning_rate=1e-2, warmup_steps=2,
                                log_interval=1, eval_interval=steps, save_interval=steps, eval_windows=4, device="cpu",
                                max_bad_steps=3), **settings})
    runtime = start_runtime("cpu", "fp32", cfg.compile)
    data = prepare_token_data(cfg, runtime)
    vocab = data.tokenizer.get_vocab_size()
    objective = make_objective(vocab) if make_objective else BigramObjective(vocab, bad_calls)
    sampler = BlockSampler(data.shards.tokens("train"), cfg.block_size, cfg.batch_size, cfg.seed)
    export = (lambda out: exported.append(objective.table.weight.detach().clone())) if exported is not None else \
        (lambda out: None)
    task = TrainingTask("bigram", objective, lambda m, x: m.logits(x), LMBatches(sampler), 1.0,
                        export=export, config=cfg)
    summary = fit(cfg, task, runtime, data)
    return objective, summary, json.loads((tmp_path / "out" / "training_history.json").read_text())
