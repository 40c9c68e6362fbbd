#!/usr/bin/env python3
"""MVLM-GPT2: train a Hugging Face GPT-2 from scratch on the Bible corpus.

    python3 mvlm_trainer.py                              # small preset (GPT-2 124M) on a GPU
    python3 mvlm_trainer.py --preset tiny --device cpu   # CPU smoke run, about a minute
    torchrun --nproc_per_node=8 mvlm_trainer.py          # DDP
    python3 mvlm_trainer.py --resume_from latest         # continue an interrupted run
    python3 mvlm_trainer.py --config models/mvlm_gpt2/train_config.json   # reproduce a run

The result in --output_dir is a save_pretrained directory (config.json, model.safetensors,
generation_config.json, tokenizer.json, tokenizer_config.json) that AutoModelForCausalLM and
AutoTokenizer load with nothing of this repository installed, plus training_history.json,
loss_curve.png, tensorboard/, train_config.json (the resolved settings) and checkpoints/.
"""
from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass
from pathlib import Path

from mvlm_engine.env import apply_training_env

apply_training_env()  # before torch initialises CUDA

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mvlm_engine import cli  # noqa: E402
from mvlm_engine.config import CPU_SMOKE_TRAINING, TrainConfig, override, setting, upper_limit_problems  # noqa: E402
from mvlm_engine.data import BlockSampler, LMBatches  # noqa: E402
from mvlm_engine.distillation import TEACHER_LOG_PROBS, distillation_loss  # noqa: E402
from mvlm_engine.fileio import plain_file_modes  # noqa: E402
from mvlm_engine.logs import get_logger  # noqa: E402
from mvlm_engine.losses import cross_entropy_from_log_partition, log_partition_function  # noqa: E402
from mvlm_engine.metrics import FLOPS_CONVENTION, matmul_weights, training_flops_per_token  # noqa: E402
from mvlm_engine.runtime import sdpa_backend_name, start_runtime, stop_runtime  # noqa: E402
from mvlm_engine.shards import prepare_token_data  # noqa: E402
from mvlm_engine.tokenizer import eos_id, save_hf_tokenizer  # noqa: E402
from mvlm_engine.trainer import TrainingTask, fit  # noqa: E402
from release import GENERATION_DEFAULTS  # noqa: E402
from release.trust import folder_check  # noqa: E402

PROG = "mvlm_trainer.py"
log = get_logger("train")


@dataclass
class GPT2Shape:
    """The architecture of an HF GPT-2 (GPT-2 small by default); vocabulary and context come
    from the run's tokenizer and --block_size."""

    n_layer: int = setting(12, "transformer blocks")
    n_embd: int = setting(768, "width of the residual stream")
    n_head: int = setting(12, "attention heads")
    # GPT2Config's own dropouts at GPT-2's own values (active in training only; evaluation and
    # generation run without them): the regularization a careful user of GPT-2 gives it.
    resid_pdrop: float = setting(0.1, "dropout on each residual branch's output (attention and MLP), training only")
    embd_pdrop: float = setting(0.1, "dropout on the token + position embeddings, training only")
    attn_pdrop: float = setting(0.1, "dropout on the attention probabilities, training only")


DROPOUTS = ("resid_pdrop", "embd_pdrop", "attn_pdrop")
SHAPE_LIMITS = {"n_layer": 1024, "n_embd": 1 << 16, "n_head": 1024}  # upper limits (also of a folder's config.json)


@dataclass
class GPT2RunConfig(TrainConfig):
    """Every setting of an MVLM-GPT2 run: the engine's plus the model shape."""

    # The baseline's recipe: AdamW (weight decay 0.1) with GPT-2's dropouts and the engine's EMA of the weights,
    # as SIM-ONE gets it (benchmarks/slowrun.py measured them on the proxy).
    # The EMA's half-life is 0.75 epoch at either preset: 976 of the small preset's 1,302 steps per epoch on
    # the full corpus, 69 of the tiny preset's 92 per proxy epoch.
    PRESETS = {
        "tiny": {**CPU_SMOKE_TRAINING, "n_layer": 2, "n_embd": 128, "n_head": 4, "ema_decay": 0.99},
        "small": {},
        "medium": {"n_layer": 24, "n_embd": 1024, "n_head": 16, "learning_rate": 3e-4, "warmup_steps": 300},
    }

    preset: str = override(TrainConfig, "preset", "small")
    output_dir: str = override(TrainConfig, "output_dir", "models/mvlm_gpt2")
    vocab_size: int = override(TrainConfig, "vocab_size", 50257)
    ema_decay: float = override(TrainConfig, "ema_decay", 0.99929)
    model: GPT2Shape = setting(factory=GPT2Shape)

    def problems(self) -> list[str]:
        errors = super().problems()
        shape = self.model
        errors += [f"--{name} must be > 0 (got {getattr(shape, name)})" for name in ("n_layer", "n_embd", "n_head")
                   if getattr(shape, name) <= 0]
        errors += [f"--{name} must be in [0, 1) (got {getattr(shape, name)})" for name in DROPOUTS
                   if not 0 <= getattr(shape, name) < 1]
        if shape.n_head > 0 and shape.n_embd % shape.n_head:
            errors.append(f"--n_embd ({shape.n_embd}) must be divisible by --n_head ({shape.n_head})")
        return errors + upper_limit_problems(shape, SHAPE_LIMITS)


def setup(argv=None) -> GPT2RunConfig:
    """Parse and check every argument; report all problems at once, before any work starts."""
    cfg = cli.parse_run_config(GPT2RunConfig, argv, PROG, __doc__)
    cli.claim_output_dir(cfg)  # checks the folders, then holds the output dir for this process
    return cfg


def build_model(shape: GPT2Shape, vocab_size: int, block_size: int, eos: int, fused_gelu: bool = True):
    """A GPT-2 of this shape, randomly initialised, with SDPA attention. GPT-2's GELU is the
    tanh approximation either way: fused_gelu runs it as one kernel ("gelu_pytorch_tanh",
    which keeps only its input for the backward pass), else as gelu_new's chain of
    element-wise ops (which keeps four (B, T, 4 d) tensors per layer)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=shape.n_embd, n_layer=shape.n_layer,
                        n_head=shape.n_head, **{name: getattr(shape, name) for name in DROPOUTS}, bos_token_id=eos,
                        eos_token_id=eos, pad_token_id=eos, tie_word_embeddings=True,
                        activation_function="gelu_pytorch_tanh" if fused_gelu else "gelu_new")
    return GPT2LMHeadModel._from_config(config, attn_implementation="sdpa")


def build_objective(cfg: GPT2RunConfig, vocab_size: int, eos: int) -> "CausalLMObjective":
    """The training module of a run: its GPT-2 (seeded) under the next-token loss."""
    torch.manual_seed(cfg.seed)
    model = build_model(cfg.model, vocab_size, cfg.block_size, eos, cfg.fused_layers)
    return CausalLMObjective(model, cfg.chunked_loss, cfg.distill_weight, cfg.distill_temperature)


class CausalLMObjective(torch.nn.Module):
    """Next-token cross-entropy on an HF GPT-2: the body's hidden states through the cross-entropy
    over lm_head.weight (mvlm_engine.losses), chunked (the (B, T, V) logits never held) or on the
    full logits of one matmul against the head padded to a multiple of 64 rows. A batch that
    carries teachers' targets (--teachers) adds distill_weight * the distillation term, from
    the HF model's full logits."""

    def __init__(self, model: torch.nn.Module, chunked_loss: bool = True, distill_weight: float = 0.0,
                 distill_temperature: float = 1.0):
        super().__init__()
        self.model, self.chunked_loss = model, chunked_loss
        self.distill_weight, self.distill_temperature = distill_weight, distill_temperature

    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, use_cache=False).logits

    def forward(self, batch: dict):
        labels, teacher = batch["labels"].flatten(), batch.get(TEACHER_LOG_PROBS)
        if teacher is None:
            hidden = self.model.transformer(input_ids=batch["input_ids"], use_cache=False).last_hidden_state
            log_partition, target_logit = log_partition_function(self.chunked_loss)(
                hidden.flatten(0, 1), self.model.lm_head.weight, labels)
            return cross_entropy_from_log_partition(log_partition, target_logit), {}
        logits = self.logits(batch["input_ids"])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), labels)
        distill = distillation_loss(logits, teacher, self.distill_temperature)
        return loss + self.distill_weight * distill, {"loss/accuracy": loss, "loss/distill": distill}


def non_embedding_params(model) -> int:
    embeddings = model.transformer.wte.weight.numel() + model.transformer.wpe.weight.numel()
    return sum(p.numel() for p in model.parameters()) - embeddings


def flops_per_token(model, block_size: int) -> float:
    """Training FLOPs per token (metrics.FLOPS_CONVENTION): the blocks' matmuls, the tied head
    (the unembedding is a matmul even though its weight is wte's), attention over block_size."""
    c = model.config
    return training_flops_per_token(matmul_weights(model.transformer.h), model.lm_head.weight.numel(), c.n_layer,
                                    c.n_embd, block_size)


def export(model, tokenizer_path: Path, block_size: int, out: Path) -> None:
    """save_pretrained directory that the HF Auto classes load on their own, sampling by default."""
    from transformers import GenerationConfig

    c = model.config  # a config of its own, not one "_from_model_config" that transformers may rebuild
    model.generation_config = GenerationConfig(bos_token_id=c.bos_token_id, eos_token_id=c.eos_token_id,
                                               pad_token_id=c.pad_token_id, **GENERATION_DEFAULTS)
    model.save_pretrained(out)
    save_hf_tokenizer(tokenizer_path, block_size, out)
    plain_file_modes(out)


def build_task(cfg: GPT2RunConfig, runtime) -> tuple[TrainingTask, object]:
    data = prepare_token_data(cfg, runtime)
    objective = build_objective(cfg, data.tokenizer.get_vocab_size(), eos_id(data.tokenizer))
    model = objective.model
    sampler = BlockSampler(data.shards.tokens("train"), cfg.block_size, cfg.batch_size, cfg.seed,
                           runtime.rank, runtime.world_size)
    shape, non_embedding = cfg.model, non_embedding_params(model)
    flops = flops_per_token(model, cfg.block_size)
    if runtime.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        attention = sdpa_backend_name(runtime, shape.n_head, shape.n_embd // shape.n_head)
        log.info(f"MVLM-GPT2 preset {cfg.preset}: {n_params / 1e6:.2f}M parameters, vocab "
                 f"{model.config.vocab_size}, {runtime.world_size} x {runtime.device}, {runtime.precision}, "
                 f"compile {runtime.compile}, SDPA backend {attention}; train tokens "
                 f"{data.shards.meta['tokens']['train']:,}; {flops / 1e6:,.1f} MFLOPs per token ({FLOPS_CONVENTION})")
    task = TrainingTask(name="MVLM-GPT2", objective=objective, logits=lambda m, x: m.logits(x),
                        batches=LMBatches(sampler), flops_per_token=flops,
                        export=lambda out: export(model, data.tokenizer_path, cfg.block_size, out), config=cfg,
                        non_embedding_params=non_embedding,
                        description="MVLM-GPT2: a GPT-2 trained from scratch on the public-domain Bible corpus.")
    return task, data


def main(argv=None) -> None:
    cfg = setup(argv)
    runtime = start_runtime(cfg.device, cfg.precision, cfg.compile)
    try:
        if cfg.prepare_data_only:
            prepare_token_data(cfg, runtime)
            return
        task, data = build_task(cfg, runtime)
        fit(cfg, dataclasses.replace(task, vet_folder=folder_check("--teachers", cfg.trust_folder_code)), runtime, data)
    finally:
        stop_runtime(runtime)


if __name__ == "__main__":
    cli.run_cli(PROG, main, sys.argv[1:])
