#!/usr/bin/env python3
"""MVLM-GPT2: train a Hugging Face GPT-2 from scratch on the Bible corpus.

    python3 mvlm_trainer.py                              # small preset (GPT-2 124M) on a GPU
    python3 mvlm_trainer.py --preset tiny --device cpu   # CPU smoke run, about a minute
    torchrun --nproc_per_node=8 mvlm_trainer.py          # DDP
    python3 mvlm_trainer.py --resume_from latest         # continue an interrupted run

The result in --output_dir is a save_pretrained directory (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json) that AutoModelForCausalLM and
AutoTokenizer load with nothing of this repository installed, plus training_history.json,
loss_curve.png, tensorboard/ and checkpoints/.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mvlm_engine.env import apply_training_env

apply_training_env()  # before torch initialises CUDA

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mvlm_engine import cli  # noqa: E402
from mvlm_engine.data import BlockSampler  # noqa: E402
from mvlm_engine.errors import fail  # noqa: E402
from mvlm_engine.metrics import transformer_flops_per_token  # noqa: E402
from mvlm_engine.runtime import sdpa_backend_name, start_runtime, stop_runtime  # noqa: E402
from mvlm_engine.tokenizer import eos_id, hf_tokenizer  # noqa: E402
from mvlm_engine.trainer import LMBatches, TrainingTask, fit, prepare_token_data  # noqa: E402

PROG = "mvlm_trainer.py"
SEED_DEFAULTS = {"preset": "small", "data_dir": "mvlm_training_dataset_complete", "output_dir": "models/mvlm_gpt2",
                 "batch_size": 16, "num_epochs": 3}
# Model shape and the training defaults that go with it. Command-line flags override both.
PRESETS = {
    "tiny": {"n_layer": 2, "n_embd": 128, "n_head": 4, "vocab_size": 4096, "block_size": 128,
             "max_steps": 300, "learning_rate": 3e-3, "warmup_steps": 30, "log_interval": 10,
             "eval_interval": 100, "save_interval": 100, "eval_windows": 64},
    "small": {"n_layer": 12, "n_embd": 768, "n_head": 12, "vocab_size": 50257, "block_size": 1024,
              "learning_rate": 6e-4, "warmup_steps": 200},
    "medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 50257, "block_size": 1024,
               "learning_rate": 3e-4, "warmup_steps": 300},
}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    cli.add_common_args(parser, tuple(PRESETS), SEED_DEFAULTS)
    return parser.parse_args(argv)


def setup(argv=None):
    """Parse and check every argument; report all problems at once, before any work starts."""
    args = parse_args(argv)
    preset = PRESETS[args.preset or SEED_DEFAULTS["preset"]]
    cfg = cli.resolve_train_config(args, SEED_DEFAULTS, preset)
    errors = cfg.problems() + cli.data_dir_problems(cfg) + cli.output_dir_problems(cfg)
    if preset["n_embd"] % preset["n_head"]:
        errors.append("n_embd must be divisible by n_head")
    fail(errors)
    return args.preset or SEED_DEFAULTS["preset"], preset, cfg


def build_model(preset: dict, vocab_size: int, block_size: int, eos: int):
    """A GPT-2 of the preset's shape, randomly initialised, with SDPA attention."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=preset["n_embd"],
                        n_layer=preset["n_layer"], n_head=preset["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=eos, eos_token_id=eos, pad_token_id=eos,
                        tie_word_embeddings=True)
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


class CausalLMObjective(torch.nn.Module):
    """Next-token cross-entropy on a causal LM whose forward returns `.logits`."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def forward(self, batch: dict):
        logits = self.logits(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch["labels"].flatten())
        return loss, {}


def non_embedding_params(model) -> int:
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return sum(p.numel() for p in model.parameters()) - embeddings


def export(model, tokenizer_path: Path, block_size: int, out: Path) -> None:
    """save_pretrained directory that the HF Auto classes load on their own."""
    model.save_pretrained(out)
    hf_tokenizer(tokenizer_path, model_max_length=block_size).save_pretrained(out)


def main(argv=None) -> None:
    preset_name, preset, cfg = setup(argv)
    runtime = start_runtime(cfg.device, cfg.precision, cfg.compile)
    try:
        torch.manual_seed(cfg.seed)
        data = prepare_token_data(cfg, runtime)
        model = build_model(preset, data.tokenizer.get_vocab_size(), cfg.block_size, eos_id(data.tokenizer))
        objective = CausalLMObjective(model)
        sampler = BlockSampler(data.shards.tokens("train"), cfg.block_size, cfg.batch_size, cfg.seed,
                               runtime.rank, runtime.world_size)
        flops = transformer_flops_per_token(non_embedding_params(model), preset["n_layer"], preset["n_embd"],
                                            cfg.block_size)
        resolved = {**vars(cfg), "preset": preset_name, "model": {k: preset[k] for k in ("n_layer", "n_embd", "n_head")}}
        if runtime.is_main:
            n_params = sum(p.numel() for p in model.parameters())
            attention = sdpa_backend_name(runtime, preset["n_head"], preset["n_embd"] // preset["n_head"])
            print(f"[train] MVLM-GPT2 preset {preset_name}: {n_params / 1e6:.2f}M parameters, vocab "
                  f"{model.config.vocab_size}, {runtime.world_size} x {runtime.device}, {runtime.precision}, "
                  f"compile {runtime.compile}, SDPA backend {attention}; train tokens "
                  f"{data.shards.meta['tokens']['train']:,}")
        task = TrainingTask(name="MVLM-GPT2", objective=objective, logits=lambda m, x: m.logits(x),
                            batches=LMBatches(sampler), flops_per_token=flops,
                            export=lambda out: export(model, data.tokenizer_path, cfg.block_size, out),
                            config=resolved)
        fit(cfg, task, runtime, data)
    finally:
        stop_runtime(runtime)


if __name__ == "__main__":
    cli.exit_on_error(PROG, main, sys.argv[1:])
